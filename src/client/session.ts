/**
 * One client connection: prologue, authentication, login, then the relay between the client and
 * the server connections its pool lends it.
 *
 * Session mode: one server for the client's lifetime.
 * Transaction mode: a server is borrowed at the first message and returned at the ReadyForQuery
 * that ends the last outstanding request outside a transaction. Protocol-level named prepared
 * statements are renamed per SQL text and prepared on demand on whichever server the client gets.
 * Statements that leave session state behind pin the client to its server until it disconnects;
 * the server is then reset before anyone else gets it.
 *
 * In both modes every request is tracked in a small queue of expected replies, so the gateway can
 * send its own messages in between (identity switches of trusted sessions, prepared statements)
 * and answer some statements itself (SET QUERY_BAND) in order with the server's replies.
 */
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { Backend, Frontend, TxStatus } from '../protocol/constants.js';
import { MessageFramer } from '../protocol/framer.js';
import {
  authenticationOk,
  backendKeyData,
  bindComplete,
  closeComplete,
  commandComplete,
  noData,
  errorResponse,
  negotiateProtocolVersion,
  noticeResponse,
  parameterStatus,
  parseComplete,
  readyForQuery,
  decodeParameterStatus,
  decodeError,
  decodeNoticeFields,
  encodeNoticeFields,
} from '../protocol/backend.js';
import {
  bindExecuteMessages,
  closeMessage,
  decodeBindNames,
  decodeParse,
  decodeQuery,
  decodeTarget,
  describeMessage,
  parseMessage,
  queryMessage,
  syncMessage,
  rewriteBind,
  rewriteParse,
} from '../protocol/frontend.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';
import { ConnectionRefused, runPrologue, type StartupMessage } from './prologue.js';
import { splice } from '../passthrough/splice.js';
import { relayLogin } from '../relay/relay-login.js';
import { SecuritySessionRefusal } from '../relay/security-session.js';
import { startupMessage } from '../protocol/frontend.js';
import { OutBatch } from './out-batch.js';
import { RequestLog, type RequestedProxy } from './request-log.js';
import type { AccessEvent } from '../audit/records.js';
import { paramSyncSql, startupParamsToSet } from './startup-params.js';
import { isFatal, isKnownFrontendType, toPgError, unknownType } from './client-errors.js';
import { authenticateClient, type AuthChannel } from '../auth/client-auth.js';
import { classifySql } from '../sql/classify.js';
import { nextConnectionId, type Logger } from '../log/logger.js';
import { clearAppliedParams, ServerConnectError, type ServerConnection } from '../server/server-connection.js';
import { TRANSACTION_MODE_RESET, type Pool, type PoolWaiter } from '../pool/pool.js';
import { TrustedSession, type TxState } from '../trust/trusted-session.js';
import type { RulesStore } from '../trust/rules-store.js';
import { isQueryBandStatement, parseSetQueryBand, QueryBandError, splitQueryBandRequest } from '../trust/query-band.js';
import { ConnectThroughError, isConnectThroughStatement, parseConnectThrough } from '../trust/connect-through.js';
import { findIdentityTamper, type TamperContext } from '../trust/tamper.js';
import { mayHaveTrustedMarking, splitTrustedMarking, trustKeyMatches } from '../trust/trusted-request.js';
import { identityMac, identityToken, NO_IDENTITY, SWITCH_MEMBER_SQL, SWITCH_MEMBER_STATEMENT, SWITCH_SQL, SWITCH_STATEMENT, UNKNOWN_IDENTITY_KEY, type Identity } from '../trust/identity.js';
import { connectThroughCallSql, dollarQuote, raiseSql } from '../trust/server-sql.js';
import { codePointLength } from '../trust/sql-text.js';
import type { SessionContext } from './context.js';
import { completes, Expect, ReplyAction, ReplyQueue } from './reply-queue.js';
import { evictOldest, statementServerName, StatementBooks, usePrepared, type ClientStatement, type StatementUndo } from './statement-books.js';

const enum Phase {
  Prologue,
  Auth,
  Ready,
  Closed,
  /** Relay forward mode: spliced to the server connection, nothing parsed. */
  Spliced,
}

/** Bytes a client may queue while waiting for a server connection before it is paused. */
const BACKLOG_PAUSE_BYTES = 1 << 20;

/** What the trusted-session checks decided about a request. */
const enum Outcome {
  /** Handled by the gateway (answered, refused or held): nothing more to send. */
  Done,
  Forward,
  /** Forward, after a switch of the server's identity: a simple query then needs a closing Sync. */
  ForwardSwitched,
}

/** Marks the swallowed cleanup query: if it fails, the end user's state may remain, so the client is closed. */
const CLEANUP_MARK = Buffer.alloc(0);
/**
 * Marks the Sync after a switch that a simple query waits for (outside a transaction block a
 * simple query cannot follow unsynced extended messages): if the switch fails, that Sync's
 * ReadyForQuery answers the query, which is then dropped.
 */
const SWITCH_SYNC_MARK = Buffer.alloc(0);
const NO_TOKEN = ['', ''] as const;
/** Marks a refusal raised through the server: its error loses the DO block's CONTEXT line. */
const REFUSAL_MARK = Buffer.alloc(0);
/** Marks the Sync closing a SET QUERY_BAND whose ProxyRole PostgreSQL had to confirm. */
const BAND_CHECK_MARK = Buffer.alloc(0);
/** Marks the Parse and Bind of the gateway's switch statement (their failure means tampering). */
const GATEWAY_STATEMENT_MARK = Buffer.alloc(0);
/** ParameterDescription with no parameters. */
const NO_PARAMETERS = Buffer.from([0x74, 0, 0, 0, 6, 0, 0]);

export class ClientSession implements PoolWaiter {
  readonly id = nextConnectionId('c');
  readonly connectedAt = Date.now();
  private phase = Phase.Prologue;
  private socket: Socket;
  private readonly log: Logger;
  user = '';
  database = '';
  applicationName = '';
  remote: string;
  tls = false;
  private protocolMinor = 0;
  pool: Pool | null = null;
  private admin = false;
  server: ServerConnection | null = null;
  private waitingForServer = false;
  private backlog: Buffer[] = [];
  private backlogBytes = 0;
  /** True while a client chunk is being framed (see onServer). */
  private readingChunk = false;
  private pausedForBacklog = false;
  private readonly framer: MessageFramer;
  private readonly toServer = new OutBatch();
  private readonly toClient = new OutBatch();
  private cancelKey: { processId: number; secretKey: Buffer } | null = null;
  private desiredParams = new Map<string, string>();
  /** Fingerprint of desiredParams, compared with the server's appliedParamsKey. */
  private paramsKey = '';
  private startupTimer: NodeJS.Timeout | null = null;
  // --- transaction-mode bookkeeping ---
  private transactionMode = false;
  private readonly statements = new StatementBooks();
  private readonly replies = new ReplyQueue();
  private pendingSyncs = 0;
  private unsynced = false;
  private discardUntilSync = false;
  private releasePending = false;
  pinnedReason: string | null = null;
  private serverSentFatal = false;
  /** Set by gateway-injected queries that failed, reported to the client once. */
  private injectedError: string | null = null;
  // --- trusted sessions (query bands, proxy users) ---
  private trust: TrustedSession | null = null;
  private rules: RulesStore | null = null;
  private readonly tamperContext: TamperContext = { trustedUser: false, proxyActive: false };
  /** Session mode forwards statement names as they are; transaction mode renames them per SQL text. */
  private renameStatements = false;
  /** Messages wait in the backlog until the replies in flight have arrived (or rules are loaded). */
  private holding = false;
  /** Session state was made while a proxy was in force: it must go before the next proxy. */
  private proxyStateDirty = false;
  private needsCleanup = false;
  /** The unnamed statement is a SET QUERY_BAND the gateway answered (extended protocol). */
  private unnamedIsBand = false;
  /** A GRANT/REVOKE CONNECT THROUGH ran: reload the rules once it is committed. */
  private rulesChangePending = false;
  private rulesUnavailable: Error | null = null;
  /** Band-led request in flight: characters the sent text has more than the client's before the rest. */
  private bandLedShift = 0;
  private bandLedSwitchDone = false;
  /** The held simple query's switch failed: drop it (its error and ReadyForQuery were sent). */
  private dropHeldRequest = false;
  private waitingForRules = false;
  /** The trusted-session state before a SET QUERY_BAND awaiting PostgreSQL's ProxyRole check. */
  private bandSnapshot: object | null = null;
  private authReceive: ((m: { type: number; buf: Buffer; start: number; end: number }) => void) | null = null;
  private authQueue: { type: number; buf: Buffer; start: number; end: number }[] = [];
  stats = { queries: 0, bytesIn: 0, bytesOut: 0 };
  /** The prologue told the client to start TLS: the raw socket must get no plain message. */
  private encryptionStarted = false;
  /** The query log's view of this session's requests (null when audit is off). */
  private requestLog: RequestLog | null = null;
  /** Messages replayed from the backlog were seen by the request log when they arrived. */
  private replaying = false;
  /** The server connection a relayed session is spliced to (forward mode). */
  private spliced: ServerConnection | null = null;

  constructor(
    socket: Socket,
    private readonly ctx: SessionContext,
  ) {
    this.socket = socket;
    this.remote = `${socket.remoteAddress}:${socket.remotePort}`;
    this.log = ctx.log.child({ conn: this.id });
    this.framer = new MessageFramer(ctx.config.limits.max_message_bytes);
  }

  /** The proxy in force for the next request (admin console). */
  get proxy(): { proxyUser: string; roleLabel: string | null } | null {
    return this.trust?.identity().grant ?? null;
  }

  get state(): string {
    if (this.phase !== Phase.Ready) return ['prologue', 'auth', 'ready', 'closed', 'relayed'][this.phase];
    if (this.waitingForServer) return 'waiting';
    return this.server ? 'active' : 'idle';
  }

  /** Runs the whole connection; resolves when it is closed. */
  async start(): Promise<void> {
    this.socket.setNoDelay(true);
    this.socket.on('error', this.onSocketError);
    this.startupTimer = setTimeout(() => {
      this.fatal(new PgError(SqlState.ProtocolViolation, 'canceling authentication due to timeout', 'FATAL'));
    }, this.ctx.config.limits.startup_timeout_ms);
    try {
      const result = await runPrologue(this.socket, { ...this.ctx.prologueOptions(), onEncryptionStarted: () => (this.encryptionStarted = true) });
      if (this.phase === Phase.Closed) return;
      if (result.kind === 'cancel') {
        this.clearStartupTimer();
        const { processId, secretKey } = result.cancel;
        const matched = this.ctx.cancels.cancel(processId, secretKey);
        // A key the gateway did not issue may belong to a passthrough session (inside its TLS).
        const forwarded = matched ? 0 : this.ctx.forwardUnknownCancel(processId, secretKey);
        this.log.info({ remote: this.remote, matched, forwarded }, 'cancel request');
        this.phase = Phase.Closed;
        result.socket.destroy();
        // Forget the session, or every cancel request leaks one and stop() waits for it.
        this.ctx.sessionClosed(this);
        return;
      }
      if (result.kind === 'passthrough') {
        this.clearStartupTimer();
        this.phase = Phase.Closed;
        this.ctx.sessionClosed(this);
        this.ctx.startPassthrough(result);
        return;
      }
      if (result.socket !== this.socket) {
        // The TLS socket made by the prologue: its errors end the session through 'close' too.
        result.socket.on('error', this.onSocketError);
        this.socket = result.socket;
      }
      this.tls = result.tls;
      await this.login(result.startup, result.leftover);
    } catch (err) {
      if (err instanceof ConnectionRefused) {
        // The client expects TLS: it got an alert (or nothing) and the socket is closed.
        this.log.warn({ remote: this.remote, reason: err.message }, 'connection refused during TLS negotiation');
        this.close();
        return;
      }
      this.fatal(toPgError(err));
    }
  }

  private readonly onSocketError = (err: Error): void => {
    this.log.debug({ err: err.message }, 'client socket error');
  };

  private clearStartupTimer(): void {
    if (this.startupTimer) clearTimeout(this.startupTimer);
    this.startupTimer = null;
  }

  // ---------------------------------------------------------------- login

  private async login(startup: StartupMessage, leftover: Buffer | null): Promise<void> {
    const cfg = this.ctx.config;
    this.socket.on('close', () => this.onClientClosed());
    this.user = startup.params.get('user') ?? '';
    this.database = startup.params.get('database') || this.user;
    this.applicationName = startup.params.get('application_name') ?? '';
    if (startup.params.has('replication')) {
      throw new PgError(SqlState.FeatureNotSupported, 'replication connections are not supported by trustgate', 'FATAL');
    }
    if (!this.user) throw new PgError(SqlState.InvalidAuthorizationSpecification, 'no PostgreSQL user name specified in startup packet', 'FATAL');
    if (cfg.tls.mode === 'require' && !this.tls) {
      throw new PgError(SqlState.InvalidAuthorizationSpecification, 'SSL is required: connect with sslmode=require or stronger', 'FATAL');
    }
    if (this.ctx.draining) throw new PgError(SqlState.CannotConnectNow, 'the gateway is shutting down', 'FATAL');
    if (!this.ctx.admitClient(this)) {
      throw new PgError(SqlState.TooManyConnections, `sorry, too many clients already (max_client_connections = ${cfg.pool.max_client_connections})`, 'FATAL');
    }
    this.admin = this.database === this.ctx.adminDatabase;
    const relayed = !this.admin && this.ctx.securityFor(this.database, this.user) === 'relay';
    if (relayed && cfg.relay.after_auth === 'forward') {
      // The server negotiates the protocol version with the client itself.
      await this.loginRelayed(startup, leftover);
      return;
    }
    // Protocol 3.0 and 3.2 are spoken; other minors and all _pq_ options are declined.
    // 3.1 was never used by PostgreSQL: a client asking for it gets 3.0; 3.3 and later get 3.2.
    this.protocolMinor = startup.minor >= 2 ? 2 : 0;
    if (startup.minor !== this.protocolMinor || startup.options.size > 0) {
      this.socket.write(negotiateProtocolVersion(this.protocolMinor, [...startup.options.keys()]));
    }
    this.desiredParams = startupParamsToSet(startup.params);
    this.paramsKey = [...this.desiredParams].map(([k, v]) => `${k}\u0000${v}`).sort().join('\u0001');
    this.log.info({ remote: this.remote, user: this.user, db: this.database, tls: this.tls, app: this.applicationName }, 'client connected');

    // Authentication messages are read through the framer from here on.
    this.phase = Phase.Auth;
    this.socket.on('data', this.onClientChunk);
    if (leftover) this.onClientData(leftover);
    this.socket.resume();

    if (relayed) {
      await this.loginRelayed(startup, null);
      return;
    }
    if (this.admin && !cfg.admin_users.includes(this.user)) {
      throw new PgError(SqlState.InsufficientPrivilege, `user "${this.user}" is not allowed to use the admin console`, 'FATAL');
    }
    if (cfg.auth.method === 'cert') this.checkClientCertificate();
    const secret = cfg.auth.method === 'trust' || cfg.auth.method === 'cert' ? null : await this.lookupSecret();
    const credentials = await authenticateClient(this.authChannel(), cfg.auth.method, this.user, secret);
    if ((this.phase as Phase) === Phase.Closed) return;
    this.log.info({ user: this.user, db: this.database, method: cfg.auth.method }, 'client authenticated');

    if (this.admin) {
      this.finishLogin(this.ctx.adminParameters());
      this.replayAuthQueue();
      return;
    }
    const pool = this.joinPool();
    if (credentials.scramKeys || credentials.md5Hash || credentials.password !== undefined) pool.credentials = credentials;
    // Borrow a server once at login: it proves the server accepts this user and database,
    // applies the client's startup parameters (errors surface as FATAL like on a direct login),
    // and gives the parameter values reported to the client.
    this.startPooled();
    if ((this.phase as Phase) === Phase.Closed) return;
    pool.acquire(this);
  }

  private readonly onClientChunk = (chunk: Buffer): void => this.onClientData(chunk);

  /** The conversation with the client while it authenticates (its messages come through the framer). */
  private authChannel(): AuthChannel {
    return {
      send: (m) => this.socket.write(m),
      // Rejects when the client goes away first: a relayed login must not keep its server
      // connection (a backend in authentication) until the startup timeout.
      receive: () =>
        new Promise((resolve, reject) => {
          const next = this.authQueue.shift();
          if (next) return resolve(next);
          const gone = () => new Error('the client closed the connection during authentication');
          if (this.phase === Phase.Closed || this.socket.destroyed) return reject(gone());
          const onClose = () => {
            this.authReceive = null;
            reject(gone());
          };
          this.socket.once('close', onClose);
          this.authReceive = (m) => {
            this.socket.off('close', onClose);
            resolve(m);
          };
        }),
    };
  }

  private joinPool(): Pool {
    const pool = this.ctx.poolFor(this.database, this.user);
    this.pool = pool;
    this.transactionMode = pool.settings.mode === 'transaction';
    this.renameStatements = this.transactionMode;
    this.rules = this.ctx.rulesFor(pool);
    this.trust = new TrustedSession(this.user, this.rules);
    if (this.ctx.audit.enabled) {
      const facts = { id: this.id, remote: this.remote, user: this.user, database: this.database, poolMode: pool.settings.mode };
      const log = new RequestLog(this.ctx.audit, facts, () => this.trust?.identity() ?? null, (safe) => this.toClient.holdUntil(safe));
      this.requestLog = log;
      this.toClient.observe = (type, buf, start, end) => log.toClient(type, buf, start, end);
    }
    return pool;
  }

  /** Authenticated: from here on the client's messages are requests, held until a server is linked. */
  private startPooled(): void {
    this.phase = Phase.Ready;
    this.socket.pause();
    this.waitingForServer = true;
    this.replayAuthQueue();
  }

  /**
   * Relay mode (docs/security-modes.md): the server authenticates the client through us. Then
   * either the session is spliced to that server connection (`relay.after_auth: forward`, the
   * client's own startup packet and protocol version), or the connection joins the user's pool
   * and the client goes on as a pooled client (`pool`).
   */
  private async loginRelayed(startup: StartupMessage, leftover: Buffer | null): Promise<void> {
    const cfg = this.ctx.config;
    const forward = cfg.relay.after_auth === 'forward';
    const route = this.ctx.serverFor(this.database);
    if (forward) {
      this.phase = Phase.Auth;
      this.socket.on('data', this.onClientChunk);
      if (leftover) this.onClientData(leftover);
      this.socket.resume();
    }
    let server: ServerConnection;
    try {
      server = await relayLogin({
        endpoint: route.endpoint,
        dbname: route.dbname,
        user: this.user,
        client: this.authChannel(),
        callback: this.ctx.securitySession,
        info: { user: this.user, database: this.database, remote: this.remote, clientTls: this.tls },
        log: this.log,
        timeoutMs: cfg.limits.startup_timeout_ms,
        forward: forward ? { startupPacket: startupPacketFor(startup, route.dbname), passOn: (m) => this.socket.write(m) } : undefined,
      });
    } catch (err) {
      if ((this.phase as Phase) === Phase.Closed) return;
      if (err instanceof ServerConnectError && err.rawError) {
        // The server's own refusal reaches the client unchanged.
        this.log.info({ user: this.user, db: this.database, err: err.message }, 'server refused relayed login');
        this.socket.write(err.rawError);
        this.close();
        return;
      }
      if (err instanceof SecuritySessionRefusal) throw new PgError(err.sqlState, err.message, 'FATAL');
      if (err instanceof PgError) throw err;
      throw new PgError(SqlState.SqlclientUnableToEstablish, `trustgate could not relay the login to the server: ${(err as Error).message}`, 'FATAL');
    }
    if ((this.phase as Phase) === Phase.Closed) {
      server.destroy();
      return;
    }
    this.log.info({ user: this.user, db: this.database, mode: cfg.relay.after_auth, pid: server.processId }, 'client authenticated by the server (relay)');
    if (forward) {
      this.spliceTo(server);
      return;
    }
    const pool = this.joinPool();
    this.startPooled();
    if ((this.phase as Phase) === Phase.Closed) {
      server.terminate();
      return;
    }
    if (pool.adopt(server)) this.onServer(server);
    else {
      // The pool is full: the login proved the client to the server; a pooled connection serves it.
      server.terminate();
      pool.acquire(this);
    }
  }

  /** Forward mode after a relayed login: bytes move as they are until either side closes. */
  private spliceTo(server: ServerConnection): void {
    this.clearStartupTimer();
    this.phase = Phase.Spliced;
    this.spliced = server;
    this.socket.off('data', this.onClientChunk);
    // Messages the client pipelined behind its last authentication answer go first.
    for (const m of this.authQueue.splice(0)) server.socket.write(m.buf.subarray(m.start, m.end));
    const partial = this.framer.takeBuffered();
    if (partial) server.socket.write(partial);
    const key = { processId: server.processId, secretKey: server.secretKey };
    const target = { cancelRunningQuery: () => this.ctx.sendCancelTo(server.endpoint, key.processId, key.secretKey) };
    this.ctx.cancels.registerExternal(key.processId, key.secretKey, target);
    splice(this.socket, server.socket, () => {
      this.ctx.cancels.unregisterExternal(key.processId, target);
      this.close();
    });
  }

  /** Messages pipelined behind the last authentication message are handled now, not dropped. */
  private replayAuthQueue(): void {
    for (const m of this.authQueue.splice(0)) this.onClientMessage(m.type, m.buf, m.start, m.end);
  }

  /** cert authentication: a verified client certificate whose common name is the user name. */
  private checkClientCertificate(): void {
    const socket = this.socket as TLSSocket;
    // Node computes `authorized` only for sockets made by a tls.Server; ours is made by hand
    // after SSLRequest, so ask OpenSSL's verification result directly.
    const handle = (socket as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
    const verifyError = typeof handle?.verifyError === 'function' ? handle.verifyError() : new Error('cannot verify');
    const cert = this.tls && !verifyError ? socket.getPeerCertificate() : null;
    if (!cert || !cert.subject) {
      this.log.warn({ reason: verifyError ? String((verifyError as { code?: string }).code ?? verifyError.message) : 'no certificate' }, 'client certificate refused');
      throw new PgError(SqlState.InvalidAuthorizationSpecification, 'connection requires a valid client certificate', 'FATAL');
    }
    const cn = Array.isArray(cert.subject.CN) ? cert.subject.CN[0] : cert.subject.CN;
    if (cn !== this.user) {
      this.log.warn({ user: this.user, cn }, 'client certificate does not match the user name');
      throw new PgError(SqlState.InvalidAuthorizationSpecification, `certificate authentication failed for user "${this.user}"`, 'FATAL');
    }
  }

  private async lookupSecret() {
    const db = this.admin ? this.ctx.secretsDatabase(this.database) : this.database;
    try {
      return await this.ctx.secrets.lookup(this.user, db);
    } catch (err) {
      this.log.error({ err: (err as Error).message }, 'credential lookup failed');
      throw new PgError(SqlState.SqlclientUnableToEstablish, `trustgate could not look up the credentials of user "${this.user}": ${(err as Error).message}`, 'FATAL');
    }
  }

  private loginServerReady(server: ServerConnection): void {
    // Apply the startup parameters synchronously-looking: run them as an internal query.
    const sets = this.paramSyncSql(server);
    const done = () => {
      const params = new Map(this.pool!.serverParams);
      for (const [k, v] of server.params) params.set(k, v);
      this.finishLogin(params);
      if (this.transactionMode) this.unlink(false);
      this.processBacklog();
    };
    if (!sets) {
      this.link(server);
      done();
      return;
    }
    server.internalQuery(sets).then(
      () => {
        if (this.phase === Phase.Closed) {
          this.pool!.release(server, true);
          return;
        }
        this.markParamsApplied(server);
        this.link(server);
        done();
      },
      (err: Error & { serverError?: { code: string; message: string } }) => {
        this.pool!.release(server, true);
        const e = err.serverError;
        this.fatal(new PgError(e?.code ?? SqlState.ConnectionFailure, e?.message ?? err.message, 'FATAL'));
      },
    );
  }

  private finishLogin(serverParams: Map<string, string>): void {
    this.clearStartupTimer();
    const out = new OutBatch();
    out.message(authenticationOk());
    for (const [k, v] of serverParams) {
      const own = this.desiredParams.get(k);
      out.message(parameterStatus(k, own ?? v));
    }
    this.cancelKey = this.ctx.cancels.register(this, this.protocolMinor >= 2 ? 32 : 4);
    out.message(backendKeyData(this.cancelKey.processId, this.cancelKey.secretKey));
    out.message(readyForQuery(TxStatus.Idle));
    out.flush(this.socket);
    this.waitingForServer = false;
    this.phase = Phase.Ready;
    this.socket.resume();
  }

  // ---------------------------------------------------------------- client → server

  private onClientData(chunk: Buffer): void {
    this.stats.bytesIn += chunk.length;
    try {
      this.readingChunk = true;
      try {
        this.framer.push(chunk, this.onClientMessage);
      } finally {
        this.readingChunk = false;
      }
      // A server lent while the chunk was read: the whole backlog leaves now, in one write.
      if (this.server && this.backlog.length > 0) this.processBacklog();
      if (this.server && !this.toServer.empty && !this.toServer.flush(this.server.socket)) this.waitForServerDrain();
      if (!this.toClient.empty) this.toClient.flush(this.socket);
    } catch (err) {
      this.fatal(toPgError(err));
    }
  }

  private readonly onClientMessage = (type: number, buf: Buffer, start: number, end: number): void => {
    if (this.phase === Phase.Auth) {
      const m = { type, buf, start, end };
      if (this.authReceive) {
        const r = this.authReceive;
        this.authReceive = null;
        r(m);
      } else if (this.authQueue.length < 4) this.authQueue.push(m);
      else throw new PgError(SqlState.ProtocolViolation, 'unexpected messages during authentication', 'FATAL');
      return;
    }
    if (this.phase !== Phase.Ready) return;
    if (type === Frontend.Terminate) {
      this.close();
      return;
    }
    if (this.admin) {
      this.adminMessage(type, buf, start, end);
      return;
    }
    if (this.requestLog && !this.replaying) {
      this.requestLog.fromClient(type, buf, start, end);
      if ((type === Frontend.Query || type === Frontend.Parse) && !this.ctx.audit.accepting) {
        // audit.on_overflow: refuse — no request runs that could not be logged.
        this.refuse(new PgError(SqlState.ConfigurationLimitExceeded, 'the audit log cannot take more records now (its database is not keeping up and its spool is unavailable); request refused', undefined, undefined, 'See SHOW AUDIT on the admin console.'), type === Frontend.Query);
        return;
      }
    }
    if (this.holding) {
      if (!isKnownFrontendType(type)) throw unknownType(type);
      this.queueBacklog(buf, start, end);
      return;
    }
    // SET QUERY_BAND needs no server (transaction mode, between transactions): answer it at once.
    if (!this.server && this.backlog.length === 0 && type === Frontend.Query && this.trust && this.answerWithoutServer(buf, start, end)) return;
    if (!this.server || this.backlog.length > 0) {
      // Garbage is refused at once: it must not wait for (or borrow) a server connection first.
      if (!isKnownFrontendType(type)) throw unknownType(type);
      // No server yet: keep the message and borrow one. Reading goes on (pausing and resuming a
      // socket costs more than the wait) until the backlog grows past a bound.
      this.queueBacklog(buf, start, end);
      if (this.backlogBytes > BACKLOG_PAUSE_BYTES && !this.pausedForBacklog) {
        this.pausedForBacklog = true;
        this.socket.pause();
      }
      if (!this.server && !this.waitingForServer) {
        this.waitingForServer = true;
        this.pool!.acquire(this);
      }
      return;
    }
    this.relayMessage(type, buf, start, end);
  };

  /**
   * Client messages once a server is linked. Every request is tracked in the reply queue (both pool
   * modes), so the gateway can slip its own messages in (identity switches, prepared statements)
   * and answer some statements itself.
   */
  private relayMessage(type: number, buf: Buffer, start: number, end: number): void {
    if (this.discardUntilSync && type !== Frontend.Sync) return;
    switch (type) {
      case Frontend.Query: {
        this.stats.queries++;
        const sql = decodeQuery(buf, start, end);
        let outcome = Outcome.Forward;
        if (this.trust) {
          outcome = this.inspectRequest(sql, true, buf, start, end);
          if (outcome === Outcome.Done) return;
          outcome = this.syncIdentity(true, buf, start, end);
          if (outcome === Outcome.Done) return;
        }
        this.noteSql(sql);
        this.forward(buf, start, end, Expect.Query);
        this.pendingSyncs++;
        if (outcome === Outcome.ForwardSwitched) this.closingSync();
        return;
      }
      case Frontend.Parse: {
        const msg = decodeParse(buf, start, end);
        if (this.trust) {
          if (msg.name === '') this.unnamedIsBand = false;
          if (this.inspectRequest(msg.query, false, buf, start, end, msg.name !== '') === Outcome.Done) return;
          if (this.syncIdentity(false, buf, start, end) === Outcome.Done) return;
        }
        this.noteSql(msg.query);
        this.unsynced = true;
        if (msg.name === '') {
          this.forward(buf, start, end, Expect.Parse);
          return;
        }
        if (!this.renameStatements) {
          if (!this.reservedName(msg.name)) this.forward(buf, start, end, Expect.Parse);
          return;
        }
        if (this.statements.has(msg.name)) {
          this.syntheticError(new PgError(SqlState.DuplicatePreparedStatement, `prepared statement "${msg.name}" already exists`));
          return;
        }
        const serverName = statementServerName(buf, msg.queryStart, end);
        const stmt: ClientStatement = { serverName, parse: rewriteParse(buf, start, end, msg, serverName) };
        this.statements.define(msg.name, stmt);
        if (usePrepared(this.server!.prepared, serverName)) {
          this.synthetic(parseComplete(), { kind: 'virtual-parse', serverName, clientName: msg.name, statement: stmt });
        } else {
          this.sendMessage(stmt.parse, Expect.Parse, ReplyAction.Forward, { kind: 'parse', serverName, clientName: msg.name, statement: stmt });
          this.notePrepared(serverName);
        }
        return;
      }
      case Frontend.Bind: {
        if (this.unnamedIsBand && end - start > 7 && buf[start + 5] === 0 && buf[start + 6] === 0) {
          this.synthetic(bindComplete());
          return;
        }
        if (!this.renameStatements && this.reservedName(decodeBindNames(buf, start, end).statement)) return;
        if (this.trust && !this.unsynced && this.syncIdentity(false, buf, start, end) === Outcome.Done) return;
        this.unsynced = true;
        if (!this.renameStatements || (end - start > 7 && buf[start + 5] === 0 && buf[start + 6] === 0)) {
          // Unnamed portal and statement (or names kept as they are): nothing to rename.
          this.forward(buf, start, end, Expect.Bind);
          return;
        }
        const names = decodeBindNames(buf, start, end);
        if (names.statement === '') {
          this.forward(buf, start, end, Expect.Bind);
          return;
        }
        const stmt = this.statementFor(names.statement);
        if (!stmt) return;
        this.sendMessage(rewriteBind(buf, end, names, stmt.serverName), Expect.Bind, ReplyAction.Forward);
        return;
      }
      case Frontend.Describe: {
        if (this.unnamedIsBand && end - start === 7 && buf[start + 6] === 0) {
          // A statement is described with its (zero) parameters first; a portal is not.
          this.synthetic(buf[start + 5] === 0x53 ? Buffer.concat([NO_PARAMETERS, noData()]) : noData());
          return;
        }
        if (!this.renameStatements && this.reservedName(decodeTarget(buf, start, end).name)) return;
        if (this.trust && !this.unsynced && this.syncIdentity(false, buf, start, end) === Outcome.Done) return;
        this.unsynced = true;
        if (!this.renameStatements || (end - start === 7 && (buf[start + 5] === 0x50 || buf[start + 5] === 0x53) && buf[start + 6] === 0)) {
          this.forward(buf, start, end, Expect.Describe); // unnamed portal or statement
          return;
        }
        const t = decodeTarget(buf, start, end);
        if (t.kind === 0x53 && t.name !== '') {
          const stmt = this.statementFor(t.name);
          if (stmt) this.sendMessage(describeMessage(0x53, stmt.serverName), Expect.Describe, ReplyAction.Forward);
          return;
        }
        this.forward(buf, start, end, Expect.Describe);
        return;
      }
      case Frontend.Close: {
        this.unsynced = true;
        const t = decodeTarget(buf, start, end);
        if (!this.renameStatements && this.reservedName(t.name)) return;
        if (this.renameStatements && t.kind === 0x53 && t.name !== '') {
          // The server keeps its copy for other clients; the client's name is forgotten.
          const statement = this.statements.forget(t.name);
          this.synthetic(closeComplete(), statement && { kind: 'close', serverName: statement.serverName, clientName: t.name, statement });
          return;
        }
        this.forward(buf, start, end, Expect.Close);
        return;
      }
      case Frontend.Execute:
        this.stats.queries++;
        if (this.unnamedIsBand && end - start > 5 && buf[start + 5] === 0) {
          this.synthetic(commandComplete('SET'));
          return;
        }
        if (this.trust && !this.unsynced && this.syncIdentity(false, buf, start, end) === Outcome.Done) return;
        this.unsynced = true;
        this.forward(buf, start, end, Expect.Execute);
        return;
      case Frontend.Sync:
        this.discardUntilSync = false;
        this.unsynced = false;
        this.forward(buf, start, end, Expect.Sync);
        this.pendingSyncs++;
        return;
      case Frontend.FunctionCall: {
        let outcome = Outcome.Forward;
        if (this.trust) {
          if (this.trust.isTrustedUser || this.trust.proxyActive) {
            // The fast-path interface calls any function by OID (set_config included), unseen by the checks.
            this.refuse(new PgError(SqlState.InsufficientPrivilege, 'the fast-path function call interface is not allowed in trusted sessions'), true, 'tamper_refused');
            return;
          }
          outcome = this.syncIdentity(true, buf, start, end);
          if (outcome === Outcome.Done) return;
        }
        this.forward(buf, start, end, Expect.Query);
        this.pendingSyncs++;
        if (outcome === Outcome.ForwardSwitched) this.closingSync();
        return;
      }
      case Frontend.Flush:
      case Frontend.CopyData:
      case Frontend.CopyDone:
      case Frontend.CopyFail:
        this.toServer.range(buf, start, end);
        return;
      case Frontend.Password:
        throw new PgError(SqlState.ProtocolViolation, 'unexpected password message after authentication', 'FATAL');
      default:
        throw unknownType(type);
    }
  }

  // ---------------------------------------------------------------- trusted sessions

  /**
   * Trusted-session checks of a request's SQL text: a trusted-request marking, SET QUERY_BAND and
   * GRANT/REVOKE CONNECT THROUGH (which the gateway handles), identity tampering (refused).
   */
  private inspectRequest(sql: string, simple: boolean, buf: Buffer, start: number, end: number, named = false): Outcome {
    if (!this.rules!.ready) return this.holdForRules(simple, buf, start, end);
    let trusted = false;
    if (mayHaveTrustedMarking(sql)) {
      const marking = splitTrustedMarking(sql);
      if (!marking) {
        // Never forward it: PostgreSQL would log the key with the statement.
        return this.refuse(new PgError(SqlState.InsufficientPrivilege, 'a trusted-request marking must start the request, before SET QUERY_BAND'), simple, 'untrusted_refused');
      }
      {
        if (!trustKeyMatches(marking.key, this.rules!.trustKey(this.user))) {
          this.log.warn({ user: this.user }, 'refused a request with an invalid trusted-request marking');
          return this.refuse(
            new PgError(SqlState.InsufficientPrivilege, 'invalid trusted-request marking', undefined, undefined, "The key is the trusted user's trust key (SELECT trustgate.trust_key(...) as a trustgate administrator)."),
            simple,
            'untrusted_refused',
          );
        }
        if (!isQueryBandStatement(marking.rest)) return this.refuse(new PgError(SqlState.FeatureNotSupported, 'a trusted-request marking is only accepted on SET QUERY_BAND'), simple);
        trusted = true;
        this.requestLog?.trustedRequest();
        sql = marking.rest;
      }
    }
    // Cheap gate: trustgate's own statements start with S (SET …), G or R (GRANT/REVOKE), or a comment.
    const first = firstSignificantChar(sql);
    if ((first === 's' || first === 'S' || first === '/' || first === '-') && isQueryBandStatement(sql)) {
      if (named) return this.refuse(new PgError(SqlState.FeatureNotSupported, 'SET QUERY_BAND cannot be prepared as a named statement'), false);
      return this.setQueryBand(sql, trusted, simple, buf, start, end);
    }
    if ((first === 'g' || first === 'G' || first === 'r' || first === 'R' || first === '/' || first === '-') && isConnectThroughStatement(sql)) {
      return this.connectThrough(sql, simple);
    }
    // A named statement may run later under a proxy: check it as if one were in force.
    const tampered = this.tamperReason(sql, named);
    return tampered ? this.refuse(tampered, simple, 'tamper_refused') : Outcome.Forward;
  }

  /** Why this SQL text may not run (it would change the identity), or null. */
  private tamperReason(sql: string, assumeProxy = false): PgError | null {
    const trust = this.trust!;
    const ctx = this.tamperContext;
    ctx.trustedUser = trust.isTrustedUser;
    ctx.proxyActive = trust.proxyActive || (assumeProxy && ctx.trustedUser);
    if (ctx.trustedUser && lexesDifferently(this.server?.params ?? this.pool!.serverParams)) {
      // The server would read the text differently from the parser that checks it.
      return new PgError(SqlState.FeatureNotSupported, 'trusted sessions need standard_conforming_strings = on and a client_encoding that is ASCII-safe (e.g. UTF8)');
    }
    const tamper = findIdentityTamper(sql, ctx);
    if (!tamper) return null;
    this.log.warn({ user: this.user, statement: tamper, proxy: ctx.proxyActive }, 'refused an identity-changing statement');
    const why = ctx.proxyActive ? 'while a proxy user is in force' : ctx.trustedUser ? 'for a trusted user' : 'through trustgate';
    return new PgError(SqlState.InsufficientPrivilege, `${tamper} is not allowed ${why}`, undefined, undefined, 'The session identity is set with SET QUERY_BAND (ProxyUser, ProxyRole) only.');
  }

  /**
   * `SET QUERY_BAND … FOR TRANSACTION; <rest>` in one simple query: the rest goes to PostgreSQL
   * behind the switch, as one statement list, so the switch (is_local) holds for exactly that
   * transaction and, if PostgreSQL refuses it, the rest does not run. One round trip.
   */
  private sendBandLed(statement: string, rest: string): Outcome {
    const server = this.server!;
    if (this.needsCleanup) this.cleanup(server);
    const identity = this.trust!.identity();
    const [token, mac] = this.tokenFor(server, identity);
    const member = identity.grant?.memberCheck;
    const role = member ? `trustgate.assert_proxy_role(${dollarQuote(member)}, ${dollarQuote(identity.role)})` : dollarQuote(identity.role);
    const prefix =
      `SELECT pg_catalog.set_config('role', ${role}, true), pg_catalog.set_config('trustgate.identity', ${dollarQuote(token)}, true), ` +
      `pg_catalog.set_config('trustgate.identity_mac', ${dollarQuote(mac)}, true);`;
    this.bandLedShift = codePointLength(prefix) - codePointLength(statement);
    this.bandLedSwitchDone = false;
    this.noteSql(rest);
    this.sendMessage(queryMessage(prefix + rest), Expect.Query, ReplyAction.BandLed, null, commandComplete('SET'));
    this.pendingSyncs++;
    // The local settings end with the transaction (ReadyForQuery I restores the session level).
    server.identityKey = identity.key;
    return Outcome.Done;
  }

  private setQueryBand(sql: string, trusted: boolean, simple: boolean, buf: Buffer, start: number, end: number): Outcome {
    if (!simple && this.unsynced) {
      return this.refuse(new PgError(SqlState.FeatureNotSupported, 'SET QUERY_BAND must be the first statement of an extended-protocol batch (send Sync before it)'), false);
    }
    // The transaction state must be known exactly: wait for the replies in flight.
    if (!this.replies.empty) return this.holdUntilDrained(buf, start, end);
    const { statement, rest } = simple ? splitQueryBandRequest(sql) : { statement: sql, rest: '' };
    let stmt;
    try {
      stmt = parseSetQueryBand(statement);
    } catch (err) {
      if (err instanceof QueryBandError) return this.refuse(new PgError(err.sqlState, err.message), simple);
      throw err;
    }
    if (rest !== '') {
      // Teradata's rule: a FOR TRANSACTION band may lead a multi-statement request, once.
      if (stmt.scope === 'session') return this.refuse(new PgError(SqlState.FeatureNotSupported, 'SET QUERY_BAND … FOR SESSION must be a statement of its own'), true);
      if (isQueryBandStatement(rest)) return this.refuse(new PgError(SqlState.FeatureNotSupported, 'SET QUERY_BAND can lead a request only once'), true);
    }
    const status = this.server?.txStatus ?? TxStatus.Idle;
    const tx: TxState = status === TxStatus.Failed ? 'failed' : status !== TxStatus.Idle ? 'in-transaction' : rest !== '' ? 'request' : 'idle';
    const before = this.trust!.snapshot();
    const grantBefore = this.trust!.identity().grant;
    try {
      if (this.trust!.setQueryBand(stmt, trusted, tx, this.proxyStateDirty)) {
        // A new end user: what the last one left in the session goes first.
        if (this.proxyStateDirty) this.needsCleanup = true;
      }
    } catch (err) {
      if (err instanceof PgError) {
        const untrusted = err.code === SqlState.InsufficientPrivilege && /trusted request/i.test(err.message);
        return this.refuse(err, simple, untrusted ? 'untrusted_refused' : 'proxy_refused', stmt.band);
      }
      throw err;
    }
    this.requestLog?.bandSet(grantBefore);
    this.log.debug({ scope: stmt.scope, trusted, proxyUser: this.trust!.identity().grant?.proxyUser }, 'query band set');
    if (rest !== '') {
      // Checked under the new band (DISCARD ALL, RESET ALL count once a proxy is in force); a
      // refusal ends the request's transaction and with it the band.
      const tampered = this.tamperReason(rest);
      return tampered ? this.refuse(tampered, true, 'tamper_refused') : this.sendBandLed(statement, rest);
    }
    if (simple && this.trust!.identity().grant?.memberCheck && this.server) {
      // Only PostgreSQL knows whether the proxy user may SET that role: switch now, so a refusal
      // answers this statement and the band is put back (Teradata checks ProxyRole at SET time).
      if (this.needsCleanup) this.cleanup(this.server);
      this.switchTo(this.server, this.trust!.identity());
      this.bandSnapshot = before;
      this.synthetic(commandComplete('SET'));
      this.sendMessage(syncMessage(), Expect.Sync, ReplyAction.Forward, null, BAND_CHECK_MARK);
      this.pendingSyncs++;
    } else if (simple) {
      this.toClient.message(commandComplete('SET'));
      this.toClient.message(readyForQuery(status));
    } else {
      this.unnamedIsBand = true;
      this.unsynced = true;
      this.synthetic(parseComplete());
    }
    return Outcome.Done;
  }

  private connectThrough(sql: string, simple: boolean): Outcome {
    if (!simple) return this.refuse(new PgError(SqlState.FeatureNotSupported, 'GRANT/REVOKE CONNECT THROUGH is supported in the simple query protocol only'), false);
    let stmt;
    try {
      stmt = parseConnectThrough(sql);
    } catch (err) {
      if (err instanceof ConnectThroughError) return this.refuse(new PgError(SqlState.SyntaxError, err.message), simple);
      throw err;
    }
    if (this.rules!.notInstalled) {
      return this.refuse(new PgError(SqlState.ObjectNotInPrerequisiteState, 'the trustgate catalog is not installed in this database', undefined, undefined, 'Run trustgate init.'), simple);
    }
    // Runs as the granting user, so PostgreSQL checks the caller's rights on every role named.
    const tag = stmt.kind.startsWith('grant') ? 'GRANT' : 'REVOKE';
    this.sendMessage(queryMessage(connectThroughCallSql(stmt)), Expect.Query, ReplyAction.RenameTag, null, commandComplete(tag));
    this.pendingSyncs++;
    this.rulesChangePending = true;
    this.requestLog?.connectThrough(tag === 'GRANT' ? 'grant' : 'revoke', sql);
    this.log.info({ user: this.user, statement: stmt.kind, trustedUser: stmt.trustedUser }, 'CONNECT THROUGH change');
    return Outcome.Done;
  }

  /**
   * Before a request goes out, the server connection must run as the client's identity. The switch
   * is a Bind/Execute of a prepared statement with no Sync after it: if PostgreSQL refuses it, the
   * request behind it is skipped up to the next Sync and never runs under the wrong identity.
   */
  private syncIdentity(simple: boolean, buf: Buffer, start: number, end: number): Outcome {
    const trust = this.trust!;
    const server = this.server!;
    if (!this.rules!.ready && trust.proxyActive) return this.holdForRules(simple, buf, start, end);
    // In a failed transaction everything but ROLLBACK fails anyway; a switch would fail it too.
    if (server.txStatus === TxStatus.Failed) return Outcome.Forward;
    if (this.needsCleanup) this.cleanup(server);
    const refusal = trust.refused;
    if (refusal) return this.refuse(refusal, simple, 'proxy_refused');
    // Known to be inside a transaction block only when nothing is in flight and the server said so.
    const maybeOutsideBlock = server.txStatus === TxStatus.Idle || !this.replies.empty;
    if (!this.switchTo(server, trust.identity())) return Outcome.Forward;
    if (simple && maybeOutsideBlock) {
      // Maybe outside a transaction block: the switch gets its own Sync and the query waits for it.
      this.sendMessage(syncMessage(), Expect.Sync, ReplyAction.Swallow, null, SWITCH_SYNC_MARK);
      this.pendingSyncs++;
      return this.holdUntilDrained(buf, start, end);
    }
    return Outcome.ForwardSwitched;
  }

  /**
   * Sends what makes `server` run as `want` (nothing if it does already): the session-level
   * identity, and for a transaction band the band's identity on top with is_local. Returns whether
   * anything was sent.
   */
  private switchTo(server: ServerConnection, want: Identity): boolean {
    // Tokens signed with a rotated identity key no longer verify: switch again.
    if (server.identityTokensFor !== this.rules!.key && server.identityTokens.size > 0) {
      forgetIdentity(server);
      server.identityTokens.clear();
      server.identityTokensFor = this.rules!.key;
    }
    if (server.identityKey === want.key) return false;
    if (want.transactionBand !== null) {
      const base = this.trust!.identityOutsideTransaction();
      if (server.sessionIdentityKey !== base.key) {
        this.emitSwitch(server, base, false);
        server.sessionIdentityKey = base.key;
      }
      this.emitSwitch(server, want, true);
    } else {
      this.emitSwitch(server, want, false);
      server.sessionIdentityKey = want.key;
    }
    server.identityKey = want.key;
    return true;
  }

  private emitSwitch(server: ServerConnection, identity: Identity, local: boolean): void {
    const member = identity.grant?.memberCheck ?? null;
    const name = member ? SWITCH_MEMBER_STATEMENT : SWITCH_STATEMENT;
    if (!server.gatewayStatements.has(name)) {
      this.sendMessage(parseMessage(name, member ? SWITCH_MEMBER_SQL : SWITCH_SQL), Expect.Parse, ReplyAction.Swallow, null, GATEWAY_STATEMENT_MARK);
      server.gatewayStatements.add(name);
    }
    const [token, mac] = this.tokenFor(server, identity);
    const params = [identity.role, token, mac, local ? 'true' : 'false'];
    if (member) params.push(member);
    this.toServer.message(bindExecuteMessages(name, params));
    this.replies.push(Expect.Bind, ReplyAction.Swallow, GATEWAY_STATEMENT_MARK, null);
    this.replies.push(Expect.Execute, ReplyAction.Swallow, null, null);
  }

  /** Session mode: statement names starting with tg_ belong to the gateway (its identity switch). Refuses them. */
  private reservedName(name: string): boolean {
    if (!name.toLowerCase().startsWith('tg_')) return false;
    this.refuse(new PgError(SqlState.InsufficientPrivilege, `prepared statement names starting with "tg_" are reserved for trustgate ("${name}")`), false, 'tamper_refused');
    return true;
  }

  /** The identity token for this backend and its MAC, made once per identity and backend. */
  private tokenFor(server: ServerConnection, identity: Identity): readonly [string, string] {
    if (identity === NO_IDENTITY) return NO_TOKEN;
    const key = this.rules!.key;
    if (server.identityTokensFor !== key || server.identityTokens.size >= 4096) {
      server.identityTokens.clear();
      server.identityTokensFor = key;
    }
    let entry = server.identityTokens.get(identity.key);
    if (!entry) {
      const token = identityToken(identity, this.user, server.processId);
      entry = [token, key ? identityMac(key, token) : ''];
      server.identityTokens.set(identity.key, entry);
    }
    return entry;
  }

  /** A simple query sent behind a switch: this Sync answers it if the switch fails (see onServerMessage). */
  private closingSync(): void {
    this.sendMessage(syncMessage(), Expect.Sync, ReplyAction.Swallow);
    this.pendingSyncs++;
  }

  /** The end user whose proxy just ended made session state: reset the connection to the trusted user's. */
  private cleanup(server: ServerConnection): void {
    this.needsCleanup = false;
    this.proxyStateDirty = false;
    this.sendMessage(queryMessage(TRANSACTION_MODE_RESET), Expect.Query, ReplyAction.Swallow, null, CLEANUP_MARK);
    this.pendingSyncs++;
    clearAppliedParams(server);
    const sets = this.paramSyncSql(server);
    if (sets) {
      this.sendMessage(queryMessage(sets), Expect.Query, ReplyAction.Swallow);
      this.pendingSyncs++;
      this.markParamsApplied(server);
    }
    if (this.transactionMode) this.pinnedReason = null;
    this.log.debug({ server: server.id }, 'server connection reset after a proxy user ended');
  }

  private cleanupFailed(message: string): void {
    this.log.error({ err: message }, 'resetting the server connection after a proxy user failed');
    this.server?.destroy();
    this.fatal(new PgError(SqlState.InternalError, 'trustgate could not clear the previous proxy user\'s session state', 'FATAL'));
  }

  /**
   * Refuses a request the way PostgreSQL would: the server raises the error itself, so an open
   * transaction block is aborted as by any failed statement, in order with the other replies.
   */
  private refuse(err: PgError, simple: boolean, event: AccessEvent | null = null, requested: RequestedProxy | null = null): Outcome {
    this.log.info({ code: err.code, err: err.message }, 'request refused');
    this.requestLog?.refused(event, err.code, err.message, requested);
    const server = this.server;
    if (!simple) this.discardUntilSync = true;
    if (!server) {
      // No server: nothing in flight, no transaction open.
      this.toClient.message(errorResponse(err));
      if (simple) this.toClient.message(readyForQuery(TxStatus.Idle));
      return Outcome.Done;
    }
    const sql = raiseSql(err);
    if (simple) {
      this.sendMessage(queryMessage(sql), Expect.Query, ReplyAction.Forward, null, REFUSAL_MARK);
      this.pendingSyncs++;
      return Outcome.Done;
    }
    this.unsynced = true;
    this.sendMessage(parseMessage('', sql), Expect.Parse, ReplyAction.Swallow);
    this.toServer.message(bindExecuteMessages('', []));
    this.replies.push(Expect.Bind, ReplyAction.Swallow, null, null);
    this.replies.push(Expect.Execute, ReplyAction.Forward, REFUSAL_MARK, null);
    return Outcome.Done;
  }

  /** Holds this message and the ones after it until the replies in flight have arrived. */
  private holdUntilDrained(buf: Buffer, start: number, end: number): Outcome {
    this.holding = true;
    this.queueBacklog(buf, start, end);
    return Outcome.Done;
  }

  /** Holds requests until the rules are loaded (bounded; then they are refused). */
  private holdForRules(simple: boolean, buf: Buffer, start: number, end: number): Outcome {
    const failure = this.rulesUnavailable;
    if (failure) {
      this.rulesUnavailable = null;
      return this.refuse(new PgError(SqlState.ConnectionFailure, failure.message), simple);
    }
    this.holding = true;
    this.queueBacklog(buf, start, end);
    if (this.waitingForRules) return Outcome.Done;
    this.waitingForRules = true;
    this.rules!.whenReady((err) => {
      this.waitingForRules = false;
      if (this.phase === Phase.Closed) return;
      this.rulesUnavailable = err;
      this.holding = false;
      this.processBacklog();
    });
    return Outcome.Done;
  }

  /** SET QUERY_BAND while no server is linked (transaction mode): true if answered. */
  private answerWithoutServer(buf: Buffer, start: number, end: number): boolean {
    const sql = decodeQuery(buf, start, end);
    const text = splitTrustedMarking(sql)?.rest ?? sql;
    if (!isQueryBandStatement(text) || splitQueryBandRequest(text).rest !== '') return false;
    // A named ProxyRole may need PostgreSQL's confirmation (see setQueryBand): that needs a server.
    try {
      if (parseSetQueryBand(text).band?.proxyRole?.kind === 'role') return false;
    } catch {
      // Malformed: answered (refused) right here.
    }
    this.stats.queries++;
    this.inspectRequest(sql, true, buf, start, end);
    if (!this.toClient.empty) this.toClient.flush(this.socket);
    return true;
  }

  /** ReadyForQuery: the transaction state, and what ends with a transaction. */
  private noteReady(server: ServerConnection, status: number): void {
    server.txStatus = status;
    if (status !== TxStatus.Idle) return;
    // Settings made with is_local ended with the transaction.
    server.identityKey = server.sessionIdentityKey;
    if (this.trust?.endTransaction() && this.proxyStateDirty) this.needsCleanup = true;
    if (this.rulesChangePending) {
      // Committed: this instance applies the change before its next request (others on NOTIFY).
      this.rulesChangePending = false;
      this.rules?.invalidate();
    }
  }

  /** Session state makes the client keep its server until it disconnects. */
  private noteSql(sql: string): void {
    const proxy = this.trust?.proxyActive === true;
    if (proxy && this.ctx.config.trusted_sessions.reset_after_proxy === 'always') {
      this.proxyStateDirty = true;
      this.pin('a proxy user ran SQL (trusted_sessions.reset_after_proxy: always)');
      return;
    }
    if (this.pinnedReason && !proxy) return;
    const c = classifySql(sql);
    if (!c.sessionState) return;
    if (proxy) this.proxyStateDirty = true;
    this.pin(c.reason ?? 'session state');
  }

  private pin(reason: string): void {
    if (this.pinnedReason) return;
    this.pinnedReason = reason;
    this.log.debug({ reason }, 'client pinned to its server connection (session state)');
  }

  private statementFor(name: string): ClientStatement | null {
    const stmt = this.statements.get(name);
    if (!stmt) {
      this.syntheticError(new PgError(SqlState.InvalidSqlStatementName, `prepared statement "${name}" does not exist`));
      return null;
    }
    if (!usePrepared(this.server!.prepared, stmt.serverName)) {
      // This server has not seen the statement: prepare it first, its ParseComplete is ours.
      this.sendMessage(stmt.parse, Expect.Parse, ReplyAction.Swallow, { kind: 'parse', serverName: stmt.serverName, clientName: null, statement: null });
      this.notePrepared(stmt.serverName);
    }
    return stmt;
  }

  /** The statement is now prepared on the linked server; the least recently used beyond the limit are closed. */
  private notePrepared(serverName: string): void {
    const prepared = this.server!.prepared;
    prepared.set(serverName, true);
    const max = this.pool!.settings.maxPreparedStatements;
    for (let oldest = evictOldest(prepared, max); oldest !== null; oldest = evictOldest(prepared, max)) {
      this.sendMessage(closeMessage(0x53, oldest), Expect.Close, ReplyAction.Swallow, { kind: 'evict', serverName: oldest, clientName: null, statement: null });
    }
  }

  private forward(buf: Buffer, start: number, end: number, kind: Expect): void {
    this.toServer.range(buf, start, end);
    this.replies.push(kind, ReplyAction.Forward, null, null);
  }

  private sendMessage(m: Buffer, kind: Expect, action: ReplyAction, undo: StatementUndo | null = null, payload: Buffer | null = null): void {
    this.toServer.message(m);
    this.replies.push(kind, action, payload, undo);
  }

  /** A reply the gateway makes itself, in order with the server's replies. */
  private synthetic(message: Buffer, undo: StatementUndo | null = null): void {
    if (this.replies.empty) this.toClient.message(message);
    else this.replies.push(Expect.Synthetic, ReplyAction.Forward, message, undo);
  }

  /** PostgreSQL failed or skipped the request at the queue head: correct the books. */
  private undoHead(): void {
    const undo = this.replies.headUndo;
    if (undo) this.statements.undo(undo, this.server!.prepared);
  }

  /** An error the gateway raises in an extended-protocol batch: like the server, skip to Sync. */
  private syntheticError(err: PgError): void {
    this.synthetic(errorResponse(err));
    this.discardUntilSync = true;
  }

  /**
   * Keeps a message until a server is linked. Messages that follow each other in one received
   * chunk stay one run, so they later leave in one write.
   */
  private queueBacklog(buf: Buffer, start: number, end: number): void {
    const last = this.backlog[this.backlog.length - 1];
    if (last && last.buffer === buf.buffer && last.byteOffset + last.length === buf.byteOffset + start) {
      this.backlog[this.backlog.length - 1] = Buffer.from(buf.buffer, last.byteOffset, last.length + end - start);
    } else {
      this.backlog.push(buf.subarray(start, end));
    }
    this.backlogBytes += end - start;
  }

  private processBacklog(): void {
    if (this.backlog.length === 0) return;
    if (!this.server) {
      if (!this.waitingForServer) {
        this.waitingForServer = true;
        this.pool!.acquire(this);
      }
      return;
    }
    const backlog = this.backlog;
    this.backlog = [];
    this.backlogBytes = 0;
    this.resumeAfterBacklog();
    this.replaying = true;
    try {
      for (const run of backlog) {
        for (let pos = 0; pos < run.length; ) {
          const end = pos + 1 + run.readInt32BE(pos + 1);
          if (this.dropHeldRequest) this.dropHeldRequest = false;
          else if (this.server) this.onClientMessage(run[pos], run, pos, end);
          else this.queueBacklog(run, pos, end); // closed meanwhile: nothing more goes out
          pos = end;
        }
      }
      if (this.server && !this.toServer.empty && !this.toServer.flush(this.server.socket)) this.waitForServerDrain();
      if (!this.toClient.empty) this.toClient.flush(this.socket);
    } catch (err) {
      this.fatal(toPgError(err));
    } finally {
      this.replaying = false;
    }
  }

  // ---------------------------------------------------------------- server → client

  private readonly onServerData = (chunk: Buffer): void => {
    const server = this.server;
    if (!server) return;
    // The server's own FATAL reaches the client as is; the gateway then adds none of its own.
    if (chunk[0] === Backend.ErrorResponse && isFatal(chunk)) this.serverSentFatal = true;
    this.stats.bytesOut += chunk.length;
    try {
      server.framer.push(chunk, this.onServerMessage);
    } catch (err) {
      this.log.error({ err: (err as Error).message }, 'invalid data from server');
      server.destroy();
      return;
    }
    if (!this.toClient.empty && !this.toClient.flush(this.socket)) this.waitForClientDrain(server);
    if (this.holding && this.replies.empty) {
      // Replies have drained: held requests go on, on this server (one that needs rules that are
      // being reloaded holds again until they are).
      this.holding = false;
      this.processBacklog();
    }
    if (this.releasePending) {
      this.releasePending = false;
      this.maybeRelease();
    }
  };

  private readonly onServerMessage = (type: number, buf: Buffer, start: number, end: number): void => {
    const server = this.server!;
    if (this.replies.empty) {
      // Nothing outstanding: asynchronous messages (notices, notifications, parameter status).
      if (type === Backend.ParameterStatus) this.noteParameterStatus(buf, start, end);
      else if (type === Backend.ReadyForQuery) this.noteReady(server, buf[start + 5]);
      this.toClient.range(buf, start, end);
      return;
    }
    const kind = this.replies.headKind;
    const action = this.replies.headAction;
    switch (type) {
      case Backend.ReadyForQuery: {
        this.noteReady(server, buf[start + 5]);
        const act = this.replies.advancePastSync();
        this.pendingSyncs--;
        if (act !== ReplyAction.Swallow) this.toClient.range(buf, start, end);
        else if (this.injectedError) {
          this.toClient.message(noticeResponse({ severity: 'WARNING', code: '01000', message: this.injectedError }));
          this.injectedError = null;
        }
        this.afterCompletion();
        if (this.pendingSyncs === 0) this.releasePending = true;
        return;
      }
      case Backend.ErrorResponse: {
        // A failed statement rolls its transaction back, and with it a switch made in it.
        if (server.identityKey !== '' || server.sessionIdentityKey !== '') forgetIdentity(server);
        if (this.replies.headPayload === REFUSAL_MARK) {
          this.toClient.message(withoutContext(buf, start, end));
          if (kind === Expect.Query) return;
        } else if (kind === Expect.Query || kind === Expect.Sync) {
          if (action === ReplyAction.BandLed) this.toClient.message(this.bandLedError(buf, start, end));
          else if (action !== ReplyAction.Swallow) this.toClient.range(buf, start, end);
          else if (this.replies.headPayload === CLEANUP_MARK) this.cleanupFailed(decodeError(buf, start, end).message);
          else this.injectedError = `trustgate could not apply session settings: ${decodeError(buf, start, end).message}`;
          return;
        }
        // An extended-protocol request failed: the server skips everything up to Sync, simple
        // queries included (one sent behind an identity switch is answered by the closing Sync).
        if (this.replies.headPayload !== REFUSAL_MARK) this.toClient.range(buf, start, end);
        if (this.replies.headPayload === GATEWAY_STATEMENT_MARK && (kind === Expect.Parse || decodeError(buf, start, end).code === '26000')) {
          // Our switch statement was taken or dropped behind our back: the connection cannot be trusted.
          this.log.error({ server: server.id, err: decodeError(buf, start, end).message }, "the gateway's switch statement was tampered with; closing the server connection");
          server.gatewayStatements.clear();
          setImmediate(() => server.destroy());
        }
        this.undoHead();
        this.replies.advance();
        let skippedQuery = false;
        while (!this.replies.empty && this.replies.headKind !== Expect.Sync) {
          if (this.replies.headKind === Expect.Query) {
            skippedQuery = true;
            this.pendingSyncs--;
          }
          this.undoHead();
          this.replies.advance();
        }
        if (!this.replies.empty && this.replies.headPayload === BAND_CHECK_MARK && this.bandSnapshot) {
          // PostgreSQL refused the ProxyRole: the band goes back to what it was.
          this.trust?.restore(this.bandSnapshot);
          this.bandSnapshot = null;
        }
        if (!this.replies.empty && (skippedQuery || this.replies.headPayload === SWITCH_SYNC_MARK)) {
          // The request behind the failed switch is answered by this Sync's ReadyForQuery.
          this.replies.setHeadAction(ReplyAction.Forward);
          if (!skippedQuery) this.dropHeldRequest = true;
        }
        return;
      }
      case Backend.CommandComplete:
        this.noteCommandTag(buf, start, end);
        break;
    }
    if (completes(type, kind)) {
      this.replies.advance();
      if (action !== ReplyAction.Swallow) this.toClient.range(buf, start, end);
      this.afterCompletion();
      return;
    }
    switch (type) {
      case Backend.ParameterStatus:
        if (action === ReplyAction.Forward) this.noteParameterStatus(buf, start, end);
        break;
      case Backend.NotificationResponse:
        this.toClient.range(buf, start, end);
        return;
    }
    if (action === ReplyAction.Forward) this.toClient.range(buf, start, end);
    else if (action === ReplyAction.RenameTag) {
      if (type === Backend.CommandComplete) this.toClient.message(this.replies.headPayload!);
      else this.toClient.range(buf, start, end);
    } else if (action === ReplyAction.BandLed) {
      if (this.bandLedSwitchDone) this.toClient.range(buf, start, end);
      else if (type === Backend.CommandComplete) {
        // The switch's own reply: the client sees its SET QUERY_BAND's.
        this.bandLedSwitchDone = true;
        this.toClient.message(this.replies.headPayload!);
      } else if (type !== Backend.RowDescription && type !== Backend.DataRow) this.toClient.range(buf, start, end);
    }
  };

  /** An error of a band-led request, with its position moved back to the client's text. */
  private bandLedError(buf: Buffer, start: number, end: number): Buffer {
    const fields = decodeNoticeFields(buf, start, end);
    const position = Number(fields.get('P'));
    if (position > 0) {
      const moved = position - this.bandLedShift;
      if (moved > 0) fields.set('P', String(moved));
      else fields.delete('P');
    }
    return encodeNoticeFields(Backend.ErrorResponse, fields);
  }

  /** After a reply completed a request: emit gateway replies now at the head; compact the queue. */
  private afterCompletion(): void {
    while (!this.replies.empty && this.replies.headKind === Expect.Synthetic) {
      this.toClient.message(this.replies.headPayload!);
      this.replies.advance();
    }
    this.replies.resetIfDrained();
  }

  /** A setting changed inside the client's own request: state the next client must not see. */
  private noteParameterStatus(buf: Buffer, start: number, end: number): void {
    const [name, value] = decodeParameterStatus(buf, start, end);
    const server = this.server!;
    if (server.params.get(name) !== value) {
      server.params.set(name, value);
      if (this.trust?.proxyActive) this.proxyStateDirty = true;
      this.pin(`setting ${name} changed`);
    }
  }

  private noteCommandTag(buf: Buffer, start: number, end: number): void {
    const len = end - start - 6;
    // ROLLBACK (also of a savepoint) and PREPARE TRANSACTION may undo an identity switch, RESET
    // (ALL) may clear its settings.
    if ((len === 5 || len === 8 || len === 19) && (this.server!.identityKey !== '' || this.server!.sessionIdentityKey !== '')) {
      const tag = buf.toString('latin1', start + 5, end - 1);
      if (tag === 'ROLLBACK' || tag === 'PREPARE TRANSACTION' || tag === 'RESET') forgetIdentity(this.server!);
    }
    // DISCARD ALL / DEALLOCATE ALL drop the server's prepared statements and settings.
    if (len === 11 || len === 14) {
      const tag = buf.toString('latin1', start + 5, end - 1);
      if (tag === 'DISCARD ALL' || tag === 'DEALLOCATE ALL') {
        this.server!.forgetPrepared();
        if (tag === 'DISCARD ALL') clearAppliedParams(this.server!);
      }
    }
  }

  // ---------------------------------------------------------------- linking

  /** PoolWaiter: a server is ours. */
  onServer(server: ServerConnection): void {
    this.waitingForServer = false;
    if (this.phase === Phase.Closed) {
      this.pool!.release(server, false);
      return;
    }
    if (!this.cancelKey) {
      this.loginServerReady(server);
      return;
    }
    this.link(server);
    const sets = this.paramSyncSql(server);
    if (sets) {
      this.sendMessage(queryMessage(sets), Expect.Query, ReplyAction.Swallow);
      this.pendingSyncs++;
      this.markParamsApplied(server);
    }
    // Mid-chunk (the pool answered at once): the rest of the chunk joins the backlog first.
    if (!this.readingChunk) this.processBacklog();
  }

  private resumeAfterBacklog(): void {
    if (!this.pausedForBacklog) return;
    this.pausedForBacklog = false;
    if (this.phase !== Phase.Closed) this.socket.resume();
  }

  /** PoolWaiter: no server could be had. */
  onPoolError(err: PgError): void {
    this.waitingForServer = false;
    if (!this.cancelKey || err.severity === 'FATAL') {
      this.fatal(new PgError(err.code, err.message, 'FATAL', err.detail));
      return;
    }
    // Answer the waiting requests as PostgreSQL answers failed ones: an error and ReadyForQuery
    // per simple query; one error per extended batch, then ReadyForQuery at its Sync.
    const replies: Buffer[] = [];
    const error = errorResponse(err);
    const ready = readyForQuery(TxStatus.Idle);
    let batchFailed = false;
    for (const type of backlogTypes(this.backlog)) {
      if (type === Frontend.Query || type === Frontend.FunctionCall) replies.push(error, ready);
      else if (type === Frontend.Sync) {
        if (!batchFailed) replies.push(error);
        replies.push(ready);
        batchFailed = false;
      } else if (!batchFailed && type !== Frontend.Flush && type !== Frontend.CopyData && type !== Frontend.CopyDone && type !== Frontend.CopyFail) {
        replies.push(error);
        batchFailed = true;
      }
    }
    // The rest of a failed batch (until its Sync) is dropped, as PostgreSQL skips it.
    this.discardUntilSync = batchFailed;
    this.backlog = [];
    this.backlogBytes = 0;
    const answer = Buffer.concat(replies);
    this.requestLog?.toClientMessages(answer);
    this.socket.write(answer);
    this.resumeAfterBacklog();
  }

  private link(server: ServerConnection): void {
    this.server = server;
    server.onData = this.onServerData;
    server.onClose = this.onServerClosed;
  }

  /** Returns the server to the pool. */
  private unlink(needsReset: boolean): void {
    const server = this.server;
    if (!server) return;
    this.server = null;
    server.onClose = noop;
    this.pool!.release(server, needsReset);
  }

  private maybeRelease(): void {
    const server = this.server;
    if (!server || !this.transactionMode || this.pinnedReason) return;
    if (this.pendingSyncs !== 0 || this.unsynced || server.txStatus !== TxStatus.Idle) return;
    if (!this.replies.empty) return;
    this.unlink(false);
  }

  /** The SQL that gives `server` this client's startup parameters, or '' if it has them. */
  private paramSyncSql(server: ServerConnection): string {
    if (server.appliedParamsKey === this.paramsKey) return '';
    return paramSyncSql(this.desiredParams, server.appliedParams);
  }

  private markParamsApplied(server: ServerConnection): void {
    server.appliedParams.clear();
    for (const [k, v] of this.desiredParams) server.appliedParams.set(k, v);
    server.appliedParamsKey = this.paramsKey;
  }

  // ---------------------------------------------------------------- flow control

  private waitForServerDrain(): void {
    const server = this.server!;
    this.socket.pause();
    server.socket.once('drain', () => {
      if (this.phase !== Phase.Closed) this.socket.resume();
    });
  }

  private waitForClientDrain(server: ServerConnection): void {
    server.socket.pause();
    this.socket.once('drain', () => {
      if (!server.closed) server.socket.resume();
    });
  }

  // ---------------------------------------------------------------- cancel

  cancelRunningQuery(): void {
    const server = this.server;
    // Nothing running for this client: a late cancel must not reach whoever uses that server now.
    if (!server || (this.transactionMode && this.pendingSyncs === 0 && !this.unsynced)) return;
    this.ctx.sendCancel(server);
  }

  // ---------------------------------------------------------------- admin console

  private adminMessage(type: number, buf: Buffer, start: number, end: number): void {
    if (type !== Frontend.Query) {
      if (type === Frontend.Sync) {
        this.socket.write(readyForQuery(TxStatus.Idle));
        return;
      }
      if (!isKnownFrontendType(type)) throw unknownType(type);
      this.socket.write(errorResponse(new PgError(SqlState.FeatureNotSupported, 'the admin console supports the simple query protocol only')));
      return;
    }
    const sql = decodeQuery(buf, start, end);
    this.socket.write(this.ctx.runAdminCommand(sql, this));
  }

  // ---------------------------------------------------------------- teardown

  private readonly onServerClosed = (server: ServerConnection): void => {
    if (this.server !== server) return;
    this.server = null;
    this.log.warn({ server: server.id }, 'server connection closed while in use');
    if (this.serverSentFatal) {
      this.close();
      return;
    }
    this.fatal(new PgError(SqlState.AdminShutdown, 'server closed the connection unexpectedly', 'FATAL'));
  };

  private onClientClosed(): void {
    if (this.phase === Phase.Closed) return;
    this.close();
  }

  /** Ends the client connection and gives its server back (reset) or closes it. */
  close(): void {
    if (this.phase === Phase.Closed) return;
    const wasReady = this.phase === Phase.Ready;
    this.phase = Phase.Closed;
    this.clearStartupTimer();
    if (this.cancelKey) this.ctx.cancels.unregister(this.cancelKey.processId);
    if (this.waitingForServer && this.pool) this.pool.cancelWait(this);
    if (this.spliced) {
      this.spliced.destroy();
      this.spliced = null;
    }
    this.requestLog?.closeAll();
    const server = this.server;
    if (server) {
      this.server = null;
      server.onClose = noop;
      const busy = this.pendingSyncs > 0 || this.unsynced || server.txStatus !== TxStatus.Idle;
      if (busy) {
        // The client left mid-request: its server cannot be handed on safely.
        this.log.info({ server: server.id }, 'client left during a request; closing its server connection');
        // A running query would keep the backend (and its pool slot) busy until it ends on its
        // own: PostgreSQL reads the Terminate only then. Cancel it so the slot comes back now.
        if (this.pendingSyncs > 0 || this.unsynced) this.ctx.sendCancel(server);
        this.pool!.discard(server);
      } else {
        this.pool!.release(server, !this.transactionMode || this.pinnedReason !== null);
      }
    }
    this.socket.end();
    this.socket.destroySoon?.();
    setTimeout(() => this.socket.destroy(), 1000).unref();
    this.ctx.sessionClosed(this);
    if (wasReady || this.user) this.log.info({ user: this.user, db: this.database, queries: this.stats.queries }, 'client disconnected');
  }

  /** Sends a FATAL (if the socket still speaks the protocol) and closes. */
  fatal(err: PgError): void {
    if (this.phase === Phase.Closed) return;
    const level = err.code === SqlState.InvalidPassword || err.code === SqlState.ProtocolViolation ? 'warn' : 'info';
    this.log[level]({ code: err.code, err: err.message }, 'closing client connection with error');
    // A spliced session's stream belongs to the server: no message of ours may enter it.
    const mayWrite = this.phase !== Phase.Spliced && !(this.phase === Phase.Prologue && this.encryptionStarted);
    const message = errorResponse(new PgError(err.code, err.message, 'FATAL', err.detail, err.hint));
    // The open request's record gets the error the client gets (close() records it).
    this.requestLog?.toClientMessages(message);
    if (this.socket.writable && mayWrite) this.socket.write(message);
    this.close();
  }

  /** Ask the client to leave (shutdown): FATAL 57P01 when idle. */
  terminate(message = 'terminating connection due to administrator command'): void {
    this.fatal(new PgError(SqlState.AdminShutdown, message, 'FATAL'));
  }

  get isInTransaction(): boolean {
    // A spliced session's state is unknown to us: on shutdown it gets the whole grace period.
    if (this.phase === Phase.Spliced) return true;
    return this.server !== null && (this.server.txStatus !== TxStatus.Idle || this.pendingSyncs > 0);
  }
}

/** The client's startup packet as the server gets it in relay forward mode: only the database is routed. */
function startupPacketFor(startup: StartupMessage, dbname: string): Buffer {
  const params = new Map(startup.params);
  params.set('database', dbname);
  return startupMessage([...params, ...startup.options], (startup.major << 16) | startup.minor);
}

/** Message types in backlog runs (each run holds whole messages back to back). */
function* backlogTypes(runs: Buffer[]): Generator<number> {
  for (const run of runs) {
    for (let pos = 0; pos < run.length; pos += 1 + run.readInt32BE(pos + 1)) yield run[pos];
  }
}

function noop(): void {}

/** A refusal raised by the gateway's DO block, without the CONTEXT line naming that block. */
function withoutContext(buf: Buffer, start: number, end: number): Buffer {
  const fields = decodeNoticeFields(buf, start, end);
  fields.delete('W');
  return encodeNoticeFields(Backend.ErrorResponse, fields);
}

/** The first character that is not whitespace ('' for none). */
function firstSignificantChar(sql: string): string {
  for (let i = 0; i < sql.length; i++) {
    const c = sql.charCodeAt(i);
    if (c !== 0x20 && c !== 0x0a && c !== 0x09 && c !== 0x0d) return sql[i];
  }
  return '';
}

/** Client-only encodings whose multibyte characters can contain ASCII bytes such as a quote. */
const UNSAFE_ENCODINGS = new Set(['SJIS', 'SHIFT_JIS_2004', 'BIG5', 'GBK', 'UHC', 'GB18030', 'JOHAB']);

/** Would the server read SQL text differently from the parser that checks it? */
function lexesDifferently(params: Map<string, string>): boolean {
  return params.get('standard_conforming_strings') === 'off' || UNSAFE_ENCODINGS.has((params.get('client_encoding') ?? '').toUpperCase());
}

/** The server's identity may have been undone (rollback, error): switch again before the next request. */
function forgetIdentity(server: ServerConnection): void {
  server.identityKey = UNKNOWN_IDENTITY_KEY;
  server.sessionIdentityKey = UNKNOWN_IDENTITY_KEY;
}
