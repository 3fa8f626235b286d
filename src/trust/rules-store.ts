/**
 * Keeps the CONNECT THROUGH rules and the identity key of one database in memory, so requests
 * never query the catalog. A control connection (the auth role, `auth.user`) loads them and
 * LISTENs on `trustgate_rules`; the catalog's trigger notifies every trustgate instance on each
 * change, and the store reloads. Until a reload has finished the store is not `ready`, and
 * sessions that depend on rules wait for it (bounded), so a change applies to the very next
 * request after the notification arrived.
 */
import { Backend } from '../protocol/constants.js';
import { ServerConnection, type ServerEndpoint } from '../server/server-connection.js';
import type { Logger } from '../log/logger.js';
import { buildRuleSet, type ConnectRuleRow, type TrustedUserRules } from './rules.js';
import { trustKeyFor } from './identity.js';
import { RULES_CHANNEL } from './catalog-sql.js';
import type { RulesSource } from './trusted-session.js';

const LOAD_RULES_SQL =
  'SELECT trusted_user, proxy_user, kind, without_role, array_to_json(roles)::text, union_role FROM trustgate.connect_rule WHERE revoked_at IS NULL';
const LOAD_KEY_SQL = "SELECT encode(trustgate.identity_key_for_gateway(), 'hex')";
/** How long a request waits for rules before it is refused. */
const READY_TIMEOUT_MS = 5_000;
const RETRY_MS = [200, 1_000, 2_000, 5_000];
/** PostgreSQL's errors for "the trustgate catalog is not installed in this database". */
const NOT_INSTALLED = new Set(['3F000', '42P01', '42883']);

export interface ControlCredentials {
  user: string;
  password: string;
}

export class RulesStore implements RulesSource {
  version = 0;
  ready = false;
  /** True once the catalog was found missing (trusted sessions are then off in this database). */
  notInstalled = false;
  private rules = new Map<string, TrustedUserRules>();
  private identityKey: Buffer | null = null;
  private readonly trustKeys = new Map<string, string>();
  private conn: ServerConnection | null = null;
  private waiters: ((err: Error | null) => void)[] = [];
  private loading = false;
  private reloadAgain = false;
  private retries = 0;
  private retryTimer: NodeJS.Timeout | null = null;
  private closed = false;

  constructor(
    private readonly endpoint: ServerEndpoint,
    readonly dbname: string,
    private readonly credentials: ControlCredentials | null,
    private readonly log: Logger,
  ) {
    if (!credentials) {
      // No control role: no rules can be read; everything stays allowed only without a proxy.
      this.ready = true;
      this.notInstalled = true;
      return;
    }
    this.reload();
  }

  rulesFor(trustedUser: string): TrustedUserRules | undefined {
    return this.rules.get(trustedUser);
  }

  /** Counts for the admin console (SHOW TRUST). */
  get summary(): { trustedUsers: number; proxyRules: number; trustOnly: number } {
    let proxyRules = 0;
    let trustOnly = 0;
    for (const r of this.rules.values()) {
      proxyRules += r.proxies.size;
      if (r.trustOnly) trustOnly++;
    }
    return { trustedUsers: this.rules.size, proxyRules, trustOnly };
  }

  get key(): Buffer | null {
    return this.identityKey;
  }

  /** The trusted-request key of a trusted user, or null when the key is unknown. */
  trustKey(trustedUser: string): string | null {
    if (!this.identityKey) return null;
    let k = this.trustKeys.get(trustedUser);
    if (!k) this.trustKeys.set(trustedUser, (k = trustKeyFor(this.identityKey, trustedUser)));
    return k;
  }

  /** Calls back once rules are loaded (or with an error after a bounded wait). */
  whenReady(callback: (err: Error | null) => void): void {
    if (this.ready) {
      callback(null);
      return;
    }
    let done = false;
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      callback(new Error(`the CONNECT THROUGH rules of database "${this.dbname}" could not be loaded`));
    }, READY_TIMEOUT_MS);
    timer.unref();
    this.waiters.push((err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      callback(err);
    });
  }

  /** Rules changed (a notification, or a change made through this instance): reload now. */
  invalidate(): void {
    if (this.closed || !this.credentials) return;
    this.ready = false;
    this.reload();
  }

  close(): void {
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.conn?.terminate();
    this.conn = null;
    for (const w of this.waiters.splice(0)) w(new Error('the gateway is shutting down'));
  }

  private reload(): void {
    if (this.loading) {
      this.reloadAgain = true;
      return;
    }
    this.loading = true;
    this.load().then(
      () => {
        this.loading = false;
        this.retries = 0;
        if (this.reloadAgain) {
          this.reloadAgain = false;
          this.reload();
          return;
        }
        this.ready = true;
        this.version++;
        for (const w of this.waiters.splice(0)) w(null);
      },
      (err: Error & { serverError?: { code: string } }) => {
        this.loading = false;
        this.reloadAgain = false;
        if (this.closed) return;
        const code = err.serverError?.code;
        if (code && NOT_INSTALLED.has(code)) {
          this.log.info({ db: this.dbname }, 'trustgate catalog not installed in this database: trusted sessions are off here (run trustgate init)');
          this.rules = new Map();
          this.notInstalled = true;
          this.ready = true;
          this.version++;
          for (const w of this.waiters.splice(0)) w(null);
          return;
        }
        this.log.warn({ db: this.dbname, err: err.message }, 'loading CONNECT THROUGH rules failed; retrying');
        const delay = RETRY_MS[Math.min(this.retries++, RETRY_MS.length - 1)];
        this.retryTimer = setTimeout(() => {
          this.retryTimer = null;
          this.reload();
        }, delay);
        this.retryTimer.unref();
      },
    );
  }

  private async load(): Promise<void> {
    const conn = await this.connection();
    const result = await conn.internalQuery(LOAD_RULES_SQL);
    const keyResult = await conn.internalQuery(LOAD_KEY_SQL);
    const rows: ConnectRuleRow[] = result.rows.map((r) => ({
      trusted_user: r[0]!,
      proxy_user: r[1],
      kind: r[2]!,
      without_role: r[3] === 't',
      roles: JSON.parse(r[4] ?? '[]') as string[],
      union_role: r[5],
    }));
    this.rules = buildRuleSet(rows);
    const hex = keyResult.rows[0]?.[0];
    const key = hex ? Buffer.from(hex, 'hex') : null;
    // The same object while the key is unchanged: sessions compare keys by reference.
    if (key === null || this.identityKey === null || !key.equals(this.identityKey)) {
      this.identityKey = key;
      this.trustKeys.clear();
    }
    this.notInstalled = false;
    this.log.debug({ db: this.dbname, trustedUsers: this.rules.size }, 'CONNECT THROUGH rules loaded');
  }

  private async connection(): Promise<ServerConnection> {
    if (this.conn && !this.conn.closed) return this.conn;
    const c = this.credentials!;
    const conn = await ServerConnection.connect(this.endpoint, this.dbname, c.user, { password: c.password }, new Map([['application_name', 'trustgate rules']]), this.log);
    if (this.closed) {
      conn.terminate();
      throw new Error('closed');
    }
    conn.onNotification = () => this.invalidate();
    conn.addCloseListener(() => {
      if (this.conn === conn) this.conn = null;
      // Notifications may have been missed while disconnected: reload on the next connection.
      if (!this.closed) this.invalidate();
    });
    await conn.internalQuery(`LISTEN ${RULES_CHANNEL}`);
    conn.onData = (chunk) => {
      conn.framer.push(chunk, (type) => {
        if (type === Backend.NotificationResponse) conn.onNotification?.();
      });
    };
    this.conn = conn;
    return conn;
  }
}

/** One store per server database, shared by all pools of that database. */
export class RulesRegistry {
  private readonly stores = new Map<string, RulesStore>();

  constructor(
    private credentials: ControlCredentials | null,
    private readonly log: Logger,
  ) {}

  storeFor(endpoint: ServerEndpoint, dbname: string): RulesStore {
    const key = `${endpoint.host}:${endpoint.port}/${dbname}`;
    let store = this.stores.get(key);
    if (!store) this.stores.set(key, (store = new RulesStore(endpoint, dbname, this.credentials, this.log)));
    return store;
  }

  list(): RulesStore[] {
    return [...this.stores.values()];
  }

  /** New control credentials (reload): stores reconnect with them. */
  reload(credentials: ControlCredentials | null): void {
    this.credentials = credentials;
    this.close();
  }

  close(): void {
    for (const s of this.stores.values()) s.close();
    this.stores.clear();
  }
}
