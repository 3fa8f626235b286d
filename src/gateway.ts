/**
 * The gateway: listener, client sessions, pools, cancel routing, admin console, reload and
 * graceful shutdown. `createGateway(config)` is the library entry point; the CLI wraps it.
 */
import net from 'node:net';
import type tls from 'node:tls';
import { EventEmitter } from 'node:events';
import { parseConfig, loadConfig } from './config/load.js';
import type { Config, ConfigInput } from './config/schema.js';
import { createLogger, type Logger } from './log/logger.js';
import { CancelRegistry } from './client/cancel-registry.js';
import { ClientSession } from './client/session.js';
import type { SessionContext } from './client/context.js';
import { SecretStore, type AuthQuerySettings } from './auth/secrets.js';
import { Pool, type PoolSettings } from './pool/pool.js';
import type { ServerConnection, ServerEndpoint } from './server/server-connection.js';
import { negotiateServerTls } from './server/tls-upgrade.js';
import { cancelRequest } from './protocol/frontend.js';
import { createClientTlsContext } from './tls/context.js';
import { runAdminCommand, type AdminTable, type AdminTarget } from './admin/console.js';
import { loadSqlParser } from './sql/classify.js';
import { RulesRegistry, type ControlCredentials, type RulesStore } from './trust/rules-store.js';
import { AuditLog } from './audit/audit-log.js';
import { resolveAuditSettings } from './audit/settings.js';
import type { SecurityMode } from './config/schema.js';
import { TlsAlert, type PassthroughTarget, type PrologueOptions, type PrologueResult, type TlsRoute } from './client/prologue.js';
import { PassthroughSession } from './passthrough/passthrough-session.js';
import { forwardSecurityMessage, type SecuritySessionCallback } from './relay/security-session.js';

export const VERSION = '0.1.0';

export interface GatewayOptions {
  /** Config file to reread on reload(); without it, reload() reapplies the given config. */
  configPath?: string;
  /** Overrides applied over the file on every (re)load, e.g. CLI flags. */
  overrides?: Record<string, unknown>;
  /** Log destination (default stdout). */
  logDestination?: NodeJS.WritableStream;
  logger?: Logger;
  /**
   * Relay mode: called for every authentication request the server sends, with the client's side
   * of the exchange (docs/library.md). Default: forward both ways unchanged.
   */
  securitySession?: SecuritySessionCallback;
}

export class Gateway extends EventEmitter implements SessionContext, AdminTarget {
  config: Config;
  log: Logger;
  readonly cancels = new CancelRegistry();
  secrets: SecretStore;
  /** CONNECT THROUGH rules per server database (trusted sessions). */
  readonly rules: RulesRegistry;
  /** Query log and access log (docs/audit.md): sessions call audit.query() / audit.access(). */
  readonly audit: AuditLog;
  tlsContext: tls.SecureContext | null;
  draining = false;
  readonly adminDatabase = 'trustgate';
  private server: net.Server | null = null;
  private readonly sessions = new Set<ClientSession>();
  private readonly passthroughs = new Set<PassthroughSession>();
  readonly securitySession: SecuritySessionCallback;
  private readonly admitted = new Set<ClientSession>();
  private readonly pools = new Map<string, Pool>();
  private maintenanceTimer: NodeJS.Timeout | null = null;
  private stopping: Promise<void> | null = null;
  private readonly startedAt = Date.now();

  constructor(
    config: Config,
    private readonly options: GatewayOptions = {},
  ) {
    super();
    this.config = config;
    this.log = options.logger ?? createLogger(config.log.level, options.logDestination);
    this.tlsContext = createClientTlsContext(config.tls);
    this.secrets = new SecretStore(config.auth.users_file, this.authQuerySettings(config), this.log);
    this.rules = new RulesRegistry(controlCredentials(this.authQuerySettings(config)), this.log);
    this.audit = new AuditLog(this.log);
    this.securitySession = options.securitySession ?? forwardSecurityMessage;
  }

  // ------------------------------------------------------------ lifecycle

  async start(): Promise<void> {
    await loadSqlParser();
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: this.config.listen.host, port: this.config.listen.port, backlog: 4096 }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.log.error({ err: err.message }, 'listener error'));
    // One audit writer per gateway, to one audit database, as the auth role (src/audit/settings.ts);
    // its default instance name needs the port really bound (configured before any client is read).
    this.audit.configure(resolveAuditSettings(this.config, controlCredentials(this.authQuerySettings(this.config)), this.address().port));
    this.maintenanceTimer = setInterval(() => this.maintain(), 1000);
    this.maintenanceTimer.unref();
    const a = this.address();
    this.log.info({ host: a.host, port: a.port, mode: this.config.pool.mode }, 'trustgate listening');
  }

  address(): { host: string; port: number } {
    const a = this.server?.address();
    if (a && typeof a === 'object') return { host: a.address, port: a.port };
    return { host: this.config.listen.host, port: this.config.listen.port };
  }

  /**
   * Graceful stop: no new clients; idle clients are told to go; clients in a transaction get
   * until `shutdown_timeout_ms` to finish it; then everything closes.
   */
  stop(timeoutMs = this.config.shutdown_timeout_ms): Promise<void> {
    this.stopping ??= this.doStop(timeoutMs);
    return this.stopping;
  }

  private async doStop(timeoutMs: number): Promise<void> {
    this.draining = true;
    this.log.info({ clients: this.sessions.size }, 'shutting down: draining clients');
    const closed = new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    const deadline = Date.now() + timeoutMs;
    // Passthrough sessions cannot be asked to leave (their stream is encrypted end to end): they get until the deadline.
    while ((this.sessions.size > 0 || this.passthroughs.size > 0) && Date.now() < deadline) {
      for (const s of this.sessions) if (!s.isInTransaction) s.terminate();
      if (this.sessions.size === 0 && this.passthroughs.size === 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    for (const s of this.sessions) s.terminate();
    for (const p of this.passthroughs) p.close();
    if (this.maintenanceTimer) clearInterval(this.maintenanceTimer);
    for (const p of this.pools.values()) p.close();
    this.secrets.close();
    this.rules.close();
    // After the sessions: their last records are queued; flush them, spool what the database cannot take.
    await this.audit.close();
    await closed;
    this.log.info('trustgate stopped');
    this.emit('stopped');
  }

  /** Rereads the configuration (file + overrides) and applies it without dropping connections. */
  reload(next?: ConfigInput): void {
    const config = next
      ? parseConfig(next)
      : this.options.configPath
        ? loadConfig(this.options.configPath, this.options.overrides)
        : this.config;
    if (config.listen.host !== this.config.listen.host || config.listen.port !== this.config.listen.port) {
      this.log.warn('listen address changes take effect after a restart');
    }
    this.config = config;
    this.log.level = config.log.level;
    this.tlsContext = createClientTlsContext(config.tls);
    this.secrets.reload(config.auth.users_file, this.authQuerySettings(config));
    this.rules.reload(controlCredentials(this.authQuerySettings(config)));
    this.audit.configure(resolveAuditSettings(config, controlCredentials(this.authQuerySettings(config)), this.address().port));
    for (const pool of this.pools.values()) {
      const { endpoint, settings } = this.poolShape(pool.clientDatabase);
      const endpointChanged = endpoint.host !== pool.endpoint.host || endpoint.port !== pool.endpoint.port;
      pool.endpoint = endpoint;
      pool.settings = settings;
      if (endpointChanged) pool.dropIdle();
    }
    this.log.info('configuration reloaded');
    this.emit('reloaded');
  }

  // ------------------------------------------------------------ connections

  private accept(socket: net.Socket): void {
    const session = new ClientSession(socket, this);
    this.sessions.add(session);
    session.start().catch((err) => this.log.error({ err: (err as Error).message }, 'client session failed'));
  }

  admitClient(session: ClientSession): boolean {
    if (this.admitted.size >= this.config.pool.max_client_connections) return false;
    this.admitted.add(session);
    return true;
  }

  sessionClosed(session: ClientSession): void {
    this.sessions.delete(session);
    this.admitted.delete(session);
  }

  // ------------------------------------------------------------ security modes

  securityFor(database: string, user: string): SecurityMode {
    const cfg = this.config;
    const mode = cfg.users[user]?.security ?? cfg.databases[database]?.security ?? cfg.databases['*']?.security;
    if (mode) return mode;
    return cfg.listen.security === 'relay' ? 'relay' : 'pooled';
  }

  serverFor(database: string): { endpoint: ServerEndpoint; dbname: string } {
    const shape = this.poolShape(database);
    return { endpoint: shape.endpoint, dbname: shape.dbname };
  }

  prologueOptions(): PrologueOptions {
    const cfg = this.config;
    const passthroughListener = cfg.listen.security === 'passthrough';
    const routed = passthroughListener || Object.keys(cfg.passthrough.servers).length > 0;
    return {
      tlsContext: this.tlsContext,
      requestCert: cfg.auth.method === 'cert',
      routeTls: routed ? (serverName) => this.routeTls(serverName) : null,
      passthroughOnly: passthroughListener,
      gssencTarget: passthroughListener && cfg.passthrough.gssenc ? { host: cfg.server.host, port: cfg.server.port } : null,
    };
  }

  /** SNI routing: a listed server name passes through; others depend on the listener. */
  private routeTls(serverName: string | null): TlsRoute {
    const cfg = this.config;
    const target = serverName ? sniTarget(cfg.passthrough.servers, serverName) : null;
    if (target) return { kind: 'passthrough', target };
    if (cfg.listen.security !== 'passthrough') return { kind: 'terminate' };
    if (cfg.passthrough.unmatched === 'server') return { kind: 'passthrough', target: { host: cfg.server.host, port: cfg.server.port } };
    return { kind: 'refuse', alert: TlsAlert.UnrecognizedName, reason: serverName ? `no passthrough route for server name "${serverName}"` : 'the client sent no server name (SNI)' };
  }

  startPassthrough(result: Extract<PrologueResult, { kind: 'passthrough' }>): void {
    if (this.draining) {
      result.socket.destroy();
      return;
    }
    const session = new PassthroughSession(
      result.socket,
      result.target,
      result.negotiation,
      result.serverName,
      result.initial,
      this.log,
      this.config.server.connect_timeout_ms,
      (s) => this.passthroughs.delete(s),
    );
    this.passthroughs.add(session);
    session.start().catch((err) => this.log.error({ err: (err as Error).message }, 'passthrough session failed'));
  }

  /**
   * The key of a passthrough session travels inside its TLS, so a plain CancelRequest cannot be
   * matched here: it goes to each server with live passthrough sessions, and only the server
   * that issued the key acts on it.
   */
  forwardUnknownCancel(processId: number, secretKey: Buffer): number {
    const targets = new Map<string, PassthroughTarget>();
    for (const p of this.passthroughs) if (p.state === 'spliced') targets.set(`${p.target.host}:${p.target.port}`, p.target);
    for (const t of targets.values()) this.sendCancelTo(t, processId, secretKey);
    return targets.size;
  }

  sendCancelTo(endpoint: PassthroughTarget, processId: number, secretKey: Buffer): void {
    const socket = net.connect({ host: endpoint.host, port: endpoint.port });
    socket.once('error', (err) => this.log.warn({ server: `${endpoint.host}:${endpoint.port}`, err: err.message }, 'cancel request failed'));
    socket.setTimeout(this.config.server.connect_timeout_ms, () => socket.destroy());
    socket.once('connect', () => socket.end(cancelRequest(processId, secretKey)));
  }

  // ------------------------------------------------------------ routing and pools

  private routeFor(database: string): { dbname: string; host: string; port: number; mode: Config['pool']['mode']; size: number } {
    const cfg = this.config;
    const route = cfg.databases[database] ?? cfg.databases['*'];
    return {
      dbname: route?.dbname ?? database,
      host: route?.host ?? cfg.server.host,
      port: route?.port ?? cfg.server.port,
      mode: route?.pool_mode ?? cfg.pool.mode,
      size: route?.pool_size ?? cfg.pool.default_size,
    };
  }

  private poolShape(clientDatabase: string): { endpoint: ServerEndpoint; settings: PoolSettings; dbname: string } {
    const r = this.routeFor(clientDatabase);
    const p = this.config.pool;
    return {
      dbname: r.dbname,
      endpoint: { host: r.host, port: r.port, tls: this.config.server.tls, connectTimeoutMs: this.config.server.connect_timeout_ms },
      settings: {
        mode: r.mode,
        size: r.size,
        minSize: p.min_size,
        waitTimeoutMs: p.wait_timeout_ms,
        idleTimeoutMs: p.idle_timeout_ms,
        lifetimeMs: p.lifetime_ms,
        healthCheckAfterMs: p.health_check_after_ms,
        maxPreparedStatements: p.max_prepared_statements,
        resetAlways: p.reset_always,
      },
    };
  }

  poolFor(database: string, user: string): Pool {
    const key = `${database}\u0000${user}`;
    let pool = this.pools.get(key);
    if (!pool) {
      const shape = this.poolShape(database);
      pool = new Pool(database, shape.dbname, user, shape.endpoint, shape.settings, this.log);
      this.pools.set(key, pool);
    }
    return pool;
  }

  rulesFor(pool: Pool): RulesStore {
    return this.rules.storeFor(pool.endpoint, pool.database);
  }

  private maintain(): void {
    for (const p of this.pools.values()) p.maintain();
  }

  private authQuerySettings(config: Config): AuthQuerySettings | null {
    const a = config.auth;
    if (!a.user) return null;
    const password = process.env[a.password_env];
    if (password === undefined) {
      throw new Error(`auth.user is set but the environment variable ${a.password_env} (auth.password_env) holding its password is not`);
    }
    return {
      query: a.query,
      user: a.user,
      password,
      database: a.database,
      endpoint: { host: config.server.host, port: config.server.port, tls: config.server.tls, connectTimeoutMs: config.server.connect_timeout_ms },
    };
  }

  secretsDatabase(database: string): string {
    return this.config.auth.database ?? (database === this.adminDatabase ? 'postgres' : database);
  }

  // ------------------------------------------------------------ cancel

  sendCancel(server: ServerConnection): void {
    server.cancelSent();
    const done = () => server.cancelLanded();
    const socket = net.connect({ host: server.endpoint.host, port: server.endpoint.port });
    socket.once('error', (err) => this.log.warn({ server: server.id, err: err.message }, 'cancel request failed'));
    socket.once('close', done);
    socket.setTimeout(server.endpoint.connectTimeoutMs, () => socket.destroy());
    socket.once('connect', () => {
      const tlsCfg = server.endpoint.tls.mode === 'prefer' ? { ...server.endpoint.tls, mode: 'disable' as const } : server.endpoint.tls;
      negotiateServerTls(socket, server.endpoint.host, tlsCfg).then(
        (s) => {
          s.end(cancelRequest(server.processId, server.secretKey));
          if (s !== socket) s.once('close', () => socket.destroy());
        },
        (err) => {
          this.log.warn({ server: server.id, err: (err as Error).message }, 'cancel request failed');
          socket.destroy();
        },
      );
    });
  }

  // ------------------------------------------------------------ admin console

  adminParameters(): Map<string, string> {
    let version = '18.0';
    for (const p of this.pools.values()) {
      const v = p.serverParams.get('server_version');
      if (v) {
        version = v;
        break;
      }
    }
    return new Map([
      ['server_version', version],
      ['server_encoding', 'UTF8'],
      ['client_encoding', 'UTF8'],
      ['DateStyle', 'ISO, MDY'],
      ['integer_datetimes', 'on'],
      ['standard_conforming_strings', 'on'],
      ['application_name', 'trustgate admin'],
    ]);
  }

  runAdminCommand(sql: string): Buffer {
    return runAdminCommand(sql, this);
  }

  showPools(): AdminTable {
    const counts = new Map<Pool, { active: number; waiting: number; idle: number }>();
    for (const s of this.sessions) {
      const pool = s.pool;
      if (!pool) continue;
      const c = counts.get(pool) ?? { active: 0, waiting: 0, idle: 0 };
      if (s.state === 'active') c.active++;
      else if (s.state === 'waiting') c.waiting++;
      else c.idle++;
      counts.set(pool, c);
    }
    return {
      columns: ['database', 'user', 'pool_mode', 'cl_active', 'cl_waiting', 'cl_idle', 'sv_active', 'sv_idle', 'sv_connecting', 'pool_size'],
      rows: [...this.pools.values()].map((p) => {
        const c = counts.get(p) ?? { active: 0, waiting: 0, idle: 0 };
        return [p.clientDatabase, p.user, p.settings.mode, c.active, c.waiting, c.idle, p.activeCount, p.idleCount, p.connectingCount, p.settings.size];
      }),
    };
  }

  showClients(): AdminTable {
    return {
      columns: ['id', 'user', 'database', 'state', 'addr', 'tls', 'application_name', 'server', 'pinned', 'proxy_user', 'proxy_role', 'connect_time', 'queries'],
      rows: [...this.sessions].map((s) => [
        s.id,
        s.user,
        s.database,
        s.state,
        s.remote,
        s.tls,
        s.applicationName,
        s.server?.id ?? null,
        s.pinnedReason,
        s.proxy?.proxyUser ?? null,
        s.proxy?.roleLabel ?? null,
        new Date(s.connectedAt).toISOString(),
        s.stats.queries,
      ]).concat(
        [...this.passthroughs].map((p) => [p.id, null, null, `passthrough ${p.state}`, p.remote, true, null, `${p.target.host}:${p.target.port}${p.serverName ? ` (${p.serverName})` : ''}`, null, null, null, new Date(p.connectedAt).toISOString(), null]),
      ),
    };
  }

  showAudit(): AdminTable {
    const a = this.audit.stats();
    const d = a.database;
    const j = a.jsonLines;
    return {
      columns: ['instance', 'enabled', 'synchronous', 'accepting', 'database', 'db_state', 'queued', 'written', 'spooled', 'replayed', 'duplicates', 'dropped', 'rejected', 'failures', 'spool_files', 'spool_bytes', 'json_lines', 'json_written', 'json_dropped', 'last_error'],
      rows: [[a.instance, a.enabled, a.synchronous, a.accepting, d?.name ?? null, d?.database ?? null, d?.queued ?? 0, d?.written ?? 0, d?.spooled ?? 0, d?.replayed ?? 0, d?.duplicates ?? 0, (d?.dropped ?? 0) + (j?.dropped ?? 0), d?.rejected ?? 0, (d?.failures ?? 0) + (j?.failures ?? 0), d?.spoolFiles ?? 0, d?.spoolBytes ?? 0, j?.target ?? null, j?.written ?? 0, j?.dropped ?? 0, d?.lastError ?? null]],
    };
  }

  showTrust(): AdminTable {
    return {
      columns: ['database', 'ready', 'installed', 'rules_version', 'trusted_users', 'proxy_rules', 'trust_only'],
      rows: this.rules.list().map((r) => [r.dbname, r.ready, !r.notInstalled, r.version, r.summary.trustedUsers, r.summary.proxyRules, r.summary.trustOnly]),
    };
  }

  showServers(): AdminTable {
    const rows: AdminTable['rows'] = [];
    const linked = new Set<ServerConnection>();
    for (const s of this.sessions) if (s.server) linked.add(s.server);
    for (const p of this.pools.values()) {
      for (const srv of p.servers()) {
        rows.push([srv.id, p.user, p.database, linked.has(srv) ? 'active' : 'idle', srv.processId, new Date(srv.createdAt).toISOString(), srv.prepared.size, srv.socket.constructor.name === 'TLSSocket']);
      }
    }
    return { columns: ['id', 'user', 'database', 'state', 'backend_pid', 'connect_time', 'prepared_statements', 'tls'], rows };
  }

  showStats(): AdminTable {
    return {
      columns: ['database', 'user', 'server_acquisitions', 'waited', 'avg_wait_ms', 'server_connects', 'server_connect_failures', 'resets'],
      rows: [...this.pools.values()].map((p) => [
        p.clientDatabase,
        p.user,
        p.stats.acquired,
        p.stats.waited,
        p.stats.waited ? (p.stats.waitMsTotal / p.stats.waited).toFixed(2) : '0',
        p.stats.connectsOk,
        p.stats.connectsFailed,
        p.stats.resets,
      ]),
    };
  }

  showConfig(): AdminTable {
    const rows: AdminTable['rows'] = [];
    const walk = (prefix: string, v: unknown) => {
      if (v && typeof v === 'object' && !Array.isArray(v)) for (const [k, x] of Object.entries(v)) walk(prefix ? `${prefix}.${k}` : k, x);
      else rows.push([prefix, Array.isArray(v) ? v.join(',') : v === undefined ? null : String(v)]);
    };
    walk('', this.config);
    return { columns: ['key', 'value'], rows };
  }

  version(): string {
    return `trustgate ${VERSION}`;
  }

  shutdown(): void {
    setImmediate(() => void this.stop());
  }

  /** Counts for tests and the CLI. */
  get clientCount(): number {
    return this.sessions.size;
  }

  poolList(): Pool[] {
    return [...this.pools.values()];
  }

  get uptimeMs(): number {
    return Date.now() - this.startedAt;
  }
}

/** Creates a gateway from a config object (validated; defaults applied). Call start() next. */
export function createGateway(config: ConfigInput | Config, options: GatewayOptions = {}): Gateway {
  return new Gateway(parseConfig(config), options);
}

function sniTarget(servers: Config['passthrough']['servers'], serverName: string): PassthroughTarget | null {
  const name = serverName.toLowerCase();
  for (const [k, v] of Object.entries(servers)) if (k.toLowerCase() === name) return v;
  return null;
}

/** The control role reading CONNECT THROUGH rules is the auth role (`auth.user`). */
function controlCredentials(auth: AuthQuerySettings | null): ControlCredentials | null {
  return auth ? { user: auth.user, password: auth.password } : null;
}
