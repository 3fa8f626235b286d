/**
 * A pool of server connections for one (server database, user): idle stack, wait queue,
 * size limit, idle/lifetime limits, health checks and reconnect with backoff.
 */
import { PgError, SqlState } from '../protocol/sqlstate.js';
import type { Logger } from '../log/logger.js';
import { TxStatus } from '../protocol/constants.js';
import { clearAppliedParams, ServerConnectError, ServerConnection, type ServerCredentials, type ServerEndpoint } from '../server/server-connection.js';
import type { PoolMode } from '../config/schema.js';

/** Someone waiting for a server connection (a client session). */
export interface PoolWaiter {
  /** Called with a linked-ready server connection. */
  onServer(server: ServerConnection): void;
  /** Called when no server could be had in time or at all. */
  onPoolError(err: PgError): void;
}

export interface PoolSettings {
  mode: PoolMode;
  size: number;
  minSize: number;
  waitTimeoutMs: number;
  idleTimeoutMs: number;
  lifetimeMs: number;
  healthCheckAfterMs: number;
  maxPreparedStatements: number;
  resetAlways: boolean;
}

interface QueuedWaiter {
  waiter: PoolWaiter;
  since: number;
}

/**
 * dblink connections (named and unnamed) survive DISCARD ALL and would be handed to the next
 * client, still logged in as whoever the last client connected as: close them if dblink is
 * installed where the pool user can reach it.
 */
export const DBLINK_RESET =
  'DO $tg$ DECLARE ns text; c text; BEGIN ' +
  'SELECT pg_catalog.quote_ident(n.nspname) INTO ns FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace ' +
  "WHERE e.extname = 'dblink' AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'); " +
  'IF ns IS NULL THEN RETURN; END IF; ' +
  "FOR c IN EXECUTE 'SELECT pg_catalog.unnest(' || ns || '.dblink_get_connections())' LOOP EXECUTE 'SELECT ' || ns || '.dblink_disconnect($1)' USING c; END LOOP; " +
  "BEGIN EXECUTE 'SELECT ' || ns || '.dblink_disconnect()'; EXCEPTION WHEN OTHERS THEN NULL; END; END $tg$";
/** Reset that leaves gateway-managed protocol-level prepared statements in place. */
export const TRANSACTION_MODE_RESET =
  'CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; ' +
  "DO $tg$ DECLARE s text; BEGIN FOR s IN SELECT name FROM pg_prepared_statements WHERE from_sql LOOP EXECUTE format('DEALLOCATE %I', s); END LOOP; END $tg$; " +
  DBLINK_RESET;
/** Session mode hands each client a clean session: everything goes. */
export const SESSION_MODE_RESET = 'DISCARD ALL';

export class Pool {
  private readonly idle: ServerConnection[] = [];
  private readonly queue: QueuedWaiter[] = [];
  /** Server connections that exist (idle, linked, resetting) plus those being opened. */
  private total = 0;
  private connecting = 0;
  private retryTimer: NodeJS.Timeout | null = null;
  private waitTimer: NodeJS.Timeout | null = null;
  private retryDelayMs = 250;
  private lastConnectError: ServerConnectError | null = null;
  private readonly all = new Set<ServerConnection>();
  /** ParameterStatus values from the most recent server login, reported to clients at startup. */
  serverParams = new Map<string, string>();
  credentials: ServerCredentials = {};
  /**
   * Relay mode with `after_auth: pool`: connections come only from relayed logins (the gateway
   * holds no secret to open more); waiting clients get the next released one.
   */
  relayFed = false;
  closed = false;
  stats = { acquired: 0, waited: 0, waitMsTotal: 0, connectsOk: 0, connectsFailed: 0, resets: 0 };

  constructor(
    /** The database name clients use (the route key); `database` is the server's name. */
    readonly clientDatabase: string,
    readonly database: string,
    readonly user: string,
    public endpoint: ServerEndpoint,
    public settings: PoolSettings,
    private readonly log: Logger,
  ) {}

  get idleCount(): number {
    return this.idle.length;
  }
  get activeCount(): number {
    return this.total - this.idle.length - this.connecting;
  }
  get waitingCount(): number {
    return this.queue.length;
  }
  get connectingCount(): number {
    return this.connecting;
  }
  servers(): Iterable<ServerConnection> {
    return this.all;
  }

  /** Hands a server to `waiter`, synchronously when one is idle. */
  acquire(waiter: PoolWaiter): void {
    if (this.closed) {
      waiter.onPoolError(new PgError(SqlState.AdminShutdown, 'pool is shutting down', 'FATAL'));
      return;
    }
    const now = Date.now();
    while (this.idle.length > 0) {
      const server = this.idle.pop()!;
      if (server.closed) continue;
      if (this.settings.healthCheckAfterMs > 0 && now - server.idleSince > this.settings.healthCheckAfterMs) {
        this.healthCheckThenHandOut(server, waiter);
        return;
      }
      this.stats.acquired++;
      waiter.onServer(server);
      return;
    }
    this.enqueue(waiter);
    this.grow();
  }

  /** Removes a waiter that gave up (client disconnected). */
  cancelWait(waiter: PoolWaiter): void {
    const i = this.queue.findIndex((q) => q.waiter === waiter);
    if (i >= 0) this.queue.splice(i, 1);
  }

  /**
   * Takes a server back. `needsReset` when the client changed session state (or in session mode);
   * a server in a transaction, with a cancel in flight or past its lifetime is dealt with here.
   */
  release(server: ServerConnection, needsReset: boolean): void {
    if (server.closed) return;
    server.onData = server.idleOnData;
    if (server.cancelsInFlight > 0) {
      // Reuse only after the cancel has reached the server, so it cannot hit the next client.
      server.whenCancelsLanded(() => this.release(server, needsReset));
      return;
    }
    if (server.txStatus !== TxStatus.Idle) {
      this.log.info({ server: server.id }, 'closing server connection left inside a transaction');
      this.discard(server);
      return;
    }
    if (this.closed || (this.settings.lifetimeMs > 0 && Date.now() - server.createdAt > this.settings.lifetimeMs)) {
      this.discard(server);
      return;
    }
    if (needsReset || this.settings.resetAlways) {
      this.stats.resets++;
      // DISCARD ALL must run alone (not in a transaction block), so dblink is closed separately.
      const reset =
        this.settings.mode === 'session'
          ? server.internalQuery(SESSION_MODE_RESET).then(() => server.internalQuery(DBLINK_RESET))
          : server.internalQuery(TRANSACTION_MODE_RESET);
      reset.then(
        () => {
          if (this.settings.mode === 'session') server.forgetPrepared();
          // Both resets run RESET ALL: the last client's startup parameters are gone (the pool
          // opens servers without any), so the next client must get its own applied again.
          clearAppliedParams(server);
          this.makeAvailable(server);
        },
        (err) => {
          this.log.warn({ server: server.id, err: err.message }, 'server reset failed; closing server connection');
          this.discard(server);
        },
      );
      return;
    }
    this.makeAvailable(server);
  }

  /** Closes a server connection that must not be reused. */
  discard(server: ServerConnection): void {
    server.terminate();
  }

  private makeAvailable(server: ServerConnection): void {
    if (server.closed) return;
    const next = this.queue.shift();
    if (next) {
      this.stats.acquired++;
      this.stats.waited++;
      this.stats.waitMsTotal += Date.now() - next.since;
      next.waiter.onServer(server);
      return;
    }
    server.idleSince = Date.now();
    this.idle.push(server);
  }

  private healthCheckThenHandOut(server: ServerConnection, waiter: PoolWaiter): void {
    this.enqueueFront(waiter);
    server.internalQuery(';', undefined, this.endpoint.connectTimeoutMs).then(
      () => this.makeAvailable(server),
      (err) => {
        this.log.info({ server: server.id, err: err.message }, 'server connection failed its health check');
        server.destroy();
        this.grow();
      },
    );
  }

  private enqueue(waiter: PoolWaiter): void {
    this.queue.push({ waiter, since: Date.now() });
    this.armWaitTimer();
  }

  /** One timer for the whole queue (not one per waiter): it fires at the oldest waiter's deadline. */
  private armWaitTimer(): void {
    const timeout = this.settings.waitTimeoutMs;
    if (this.waitTimer || timeout === 0 || this.queue.length === 0) return;
    let oldest = Infinity;
    for (const q of this.queue) oldest = Math.min(oldest, q.since);
    this.waitTimer = setTimeout(() => this.expireWaiters(), Math.max(0, oldest + timeout - Date.now()));
  }

  private expireWaiters(): void {
    this.waitTimer = null;
    const deadline = Date.now() - this.settings.waitTimeoutMs;
    for (const q of this.queue.filter((w) => w.since <= deadline)) this.timeOut(q);
    this.armWaitTimer();
  }

  private enqueueFront(waiter: PoolWaiter): void {
    this.enqueue(waiter);
    this.queue.unshift(this.queue.pop()!);
  }

  private timeOut(q: QueuedWaiter): void {
    const i = this.queue.indexOf(q);
    if (i < 0) return;
    this.queue.splice(i, 1);
    const cause = this.lastConnectError ? `; last server connection attempt failed: ${this.lastConnectError.message}` : '';
    q.waiter.onPoolError(
      new PgError(
        this.lastConnectError ? SqlState.SqlclientUnableToEstablish : SqlState.QueryCanceled,
        `no server connection available for database "${this.database}", user "${this.user}" within ${this.settings.waitTimeoutMs} ms (pool size ${this.settings.size})${cause}`,
        'ERROR',
      ),
    );
  }

  /** Opens server connections while clients wait and the size limit allows. */
  private grow(): void {
    if (this.relayFed && !this.credentialsKnown()) return;
    while (this.queue.length > this.connecting && this.total < this.settings.size && !this.retryTimer && !this.closed) {
      this.openOne();
    }
  }

  /** Keeps `minSize` connections open. */
  maintain(): void {
    if (this.closed) return;
    const now = Date.now();
    // Close connections idle too long (oldest first, at the bottom of the stack), down to minSize.
    if (this.settings.idleTimeoutMs > 0) {
      for (let i = 0; i < this.idle.length && this.total > this.settings.minSize; ) {
        const s = this.idle[i];
        if (now - s.idleSince > this.settings.idleTimeoutMs || (this.settings.lifetimeMs > 0 && now - s.createdAt > this.settings.lifetimeMs)) {
          this.idle.splice(i, 1);
          this.discard(s);
        } else i++;
      }
    }
    while (this.total < this.settings.minSize && !this.retryTimer && this.connecting === 0 && this.credentialsKnown()) this.openOne();
  }

  private credentialsKnown(): boolean {
    const c = this.credentials;
    return Boolean(c.password !== undefined || c.scramKeys || c.md5Hash);
  }

  private openOne(): void {
    this.total++;
    this.connecting++;
    ServerConnection.connect(this.endpoint, this.database, this.user, this.credentials, new Map(), this.log).then(
      (server) => {
        this.connecting--;
        this.stats.connectsOk++;
        this.retryDelayMs = 250;
        this.lastConnectError = null;
        this.track(server);
        this.makeAvailable(server);
      },
      (err: ServerConnectError) => {
        this.connecting--;
        this.total--;
        this.stats.connectsFailed++;
        this.lastConnectError = err;
        this.log.warn({ db: this.database, user: this.user, err: err.message }, 'server connection failed');
        if (err.permanent) {
          // Retrying cannot help: tell everyone waiting, with the server's own error if any.
          const e = err.serverError;
          const pgErr = e
            ? new PgError(e.code, e.message, 'FATAL', e.detail)
            : new PgError(SqlState.SqlclientUnableToEstablish, `trustgate could not connect to the server: ${err.message}`, 'FATAL');
          for (const q of this.queue.splice(0)) {
                  q.waiter.onPoolError(pgErr);
          }
          return;
        }
        if (this.queue.length > 0 && !this.retryTimer) {
          this.retryTimer = setTimeout(() => {
            this.retryTimer = null;
            this.grow();
          }, this.retryDelayMs);
          this.retryDelayMs = Math.min(this.retryDelayMs * 2, 5000);
        }
      },
    );
  }

  /**
   * Takes in a connection a relayed login opened (already authenticated, lent to the caller at
   * once). False when the pool is full or closed: the caller closes it.
   */
  adopt(server: ServerConnection): boolean {
    if (this.closed || this.total >= this.settings.size) return false;
    this.relayFed = true;
    this.total++;
    this.stats.acquired++;
    this.track(server);
    return true;
  }

  private track(server: ServerConnection): void {
    this.all.add(server);
    this.serverParams = new Map(server.params);
    this.log.info({ server: server.id, db: this.database, user: this.user, pid: server.processId }, 'server connection opened');
    server.addCloseListener(() => this.forget(server));
    server.idleOnData = (chunk) => this.unexpectedData(server, chunk);
    server.onData = server.idleOnData;
  }

  private forget(server: ServerConnection): void {
    if (!this.all.delete(server)) return;
    this.total--;
    const i = this.idle.indexOf(server);
    if (i >= 0) this.idle.splice(i, 1);
    this.log.info({ server: server.id, db: this.database, user: this.user }, 'server connection closed');
    if (this.queue.length > 0) this.grow();
  }

  /** Bytes from an idle server: usually a FATAL before shutdown. The connection is done for. */
  private unexpectedData(server: ServerConnection, _chunk: Buffer): void {
    this.log.info({ server: server.id }, 'idle server connection sent data; closing it');
    server.destroy();
  }

  /** Closes idle connections now and the rest when released. */
  close(): void {
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.waitTimer) clearTimeout(this.waitTimer);
    for (const s of this.idle.splice(0)) this.discard(s);
    for (const q of this.queue.splice(0)) {
      q.waiter.onPoolError(new PgError(SqlState.AdminShutdown, 'terminating connection due to administrator command', 'FATAL'));
    }
  }

  /** Drops every idle connection (e.g. after a config reload changed the endpoint). */
  dropIdle(): void {
    for (const s of this.idle.splice(0)) this.discard(s);
  }
}
