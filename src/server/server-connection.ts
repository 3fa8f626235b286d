/**
 * One connection from the gateway to PostgreSQL: connect, negotiate TLS, log in, and afterwards
 * hand raw bytes to whoever owns it (a client session while linked, the pool while idle).
 */
import net, { type Socket } from 'node:net';
import { AuthCode, Backend, TxStatus } from '../protocol/constants.js';
import { MessageFramer } from '../protocol/framer.js';
import { decodeError, decodeParameterStatus, type ServerError } from '../protocol/backend.js';
import {
  parseMessageForInternalQuery,
  passwordMessage,
  queryMessage,
  saslInitialResponse,
  saslResponse,
  startupMessage,
  terminateMessage,
} from '../protocol/frontend.js';
import { ScramClientExchange, SCRAM_SHA_256 } from '../auth/scram.js';
import { md5PasswordHash, md5Response } from '../auth/md5.js';
import { negotiateServerTls, type ServerTlsConfig } from './tls-upgrade.js';
import { nextConnectionId, type Logger } from '../log/logger.js';

/** What the gateway may use to log in to PostgreSQL as a user. Never a client's password on disk. */
export interface ServerCredentials {
  password?: string;
  /** SCRAM keys recovered from a client's proof (passthrough, as PgBouncer does). */
  scramKeys?: { clientKey: Buffer; serverKey: Buffer };
  /** A password-equivalent md5 hash ('md5…'), usable for md5 server authentication only. */
  md5Hash?: string;
}

export interface ServerEndpoint {
  host: string;
  port: number;
  tls: ServerTlsConfig;
  connectTimeoutMs: number;
}

/**
 * A login where the server authenticates someone else through this connection (relay mode):
 * the gateway holds no secret, and each authentication request is answered by `authenticate`.
 */
export interface RelayedLogin {
  /** Answers one authentication request (the whole 'R' message): the message to send back, or null. */
  authenticate(request: Buffer): Promise<Buffer | null>;
  /** Gets every other message of the login, AuthenticationOk included, as received. */
  passOn?(message: Buffer): void;
  /** Sent instead of the StartupMessage the connection would build (the client's own). */
  startupPacket?: Buffer;
  /** Bound on the whole login (a person may be typing a password). */
  timeoutMs: number;
  /** The caller takes the socket over after login (splice): nothing is attached to it. */
  detach?: boolean;
}

/** A failure to open a server connection; `serverError` is set when PostgreSQL refused us. */
export class ServerConnectError extends Error {
  /** The server's ErrorResponse as received (relay mode passes it on unchanged). */
  rawError?: Buffer;
  constructor(
    message: string,
    readonly serverError?: ServerError,
    /** Set for failures a retry cannot fix that carry no server error (TLS verification). */
    private readonly notRetryable = false,
  ) {
    super(message);
    this.name = 'ServerConnectError';
  }
  /** True when retrying cannot help (authentication, unknown database, certificate, …). */
  get permanent(): boolean {
    if (this.notRetryable) return true;
    const c = this.serverError?.code ?? '';
    return c.startsWith('28') || c === '3D000' || c === '42501' || c === '08P01' || c === '0A000';
  }
}

export interface InternalQueryResult {
  rows: (string | null)[][];
  tags: string[];
}

export class ServerConnection {
  readonly id = nextConnectionId('s');
  readonly framer = new MessageFramer(1 << 30);
  readonly createdAt = Date.now();
  /** When the connection last became idle in its pool. */
  idleSince = Date.now();
  processId = 0;
  secretKey: Buffer = Buffer.alloc(0);
  readonly params = new Map<string, string>();
  txStatus: number = TxStatus.Idle;
  closed = false;
  /** Server-side names of protocol-level prepared statements present here, oldest first. */
  readonly prepared = new Map<string, true>();
  /** Identity tokens and their MACs made for this backend, by identity key (see ClientSession.emitSwitch). */
  readonly identityTokens = new Map<string, readonly [token: string, mac: string]>();
  identityTokensFor: Buffer | null = null;
  /** The gateway's own prepared statements here (identity switches); never evicted. */
  readonly gatewayStatements = new Set<string>();
  /** Startup parameters currently in effect for the client that last used this connection. */
  readonly appliedParams = new Map<string, string>();
  /** Fingerprint of `appliedParams` (see ClientSession), so a matching client skips the diff. */
  appliedParamsKey: string | null = null;
  /** Cancel requests in flight for this connection; it must not be reused before they land. */
  cancelsInFlight = 0;
  /** Runs once when the last cancel in flight has landed (see whenCancelsLanded). */
  private afterCancels: (() => void) | null = null;
  /** Receives server bytes; set by the owner (client session or pool). */
  onData: (chunk: Buffer) => void = () => {};
  /** Called for each NotificationResponse while the connection runs internal queries or idles (LISTEN). */
  onNotification: (() => void) | null = null;
  /** Identity (trusted sessions) in effect now, and at session level (outside the transaction). */
  identityKey = '';
  sessionIdentityKey = '';
  /** Called once when the connection is gone. */
  onClose: (conn: ServerConnection) => void = noop;
  /** What the pool sets as `onData` while the connection is idle (made once, not per release). */
  idleOnData: (chunk: Buffer) => void = noop;
  private closeListeners: ((conn: ServerConnection) => void)[] = [];

  private constructor(
    readonly socket: Socket,
    readonly endpoint: ServerEndpoint,
    readonly database: string,
    readonly user: string,
    readonly log: Logger,
  ) {}

  static async connect(
    endpoint: ServerEndpoint,
    database: string,
    user: string,
    credentials: ServerCredentials,
    startupParams: Map<string, string>,
    parentLog: Logger,
    relay?: RelayedLogin,
  ): Promise<ServerConnection> {
    const raw = await openSocket(endpoint);
    let socket: Socket;
    try {
      socket = await negotiateServerTls(raw, endpoint.host, endpoint.tls);
    } catch (err) {
      raw.destroy();
      // A certificate or TLS-policy failure will not heal by retrying: fail the waiters now.
      throw new ServerConnectError((err as Error).message, undefined, true);
    }
    socket.setNoDelay(true);
    const conn = new ServerConnection(socket, endpoint, database, user, parentLog);
    try {
      await conn.login(credentials, startupParams, relay);
    } catch (err) {
      socket.destroy();
      throw err;
    }
    for (const [k, v] of startupParams) conn.appliedParams.set(k, v);
    if (!relay?.detach) conn.attach();
    return conn;
  }

  /** Startup and authentication, before the connection is handed out. */
  private login(credentials: ServerCredentials, startupParams: Map<string, string>, relay?: RelayedLogin): Promise<void> {
    const socket = this.socket;
    const params = new Map<string, string>([
      ['user', this.user],
      ['database', this.database],
      ...startupParams,
    ]);
    socket.write(relay?.startupPacket ?? startupMessage(params));
    let scram: ScramClientExchange | null = null;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => fail(new ServerConnectError('timeout during server login')), relay?.timeoutMs ?? this.endpoint.connectTimeoutMs);
      const framer = new MessageFramer(1 << 20);
      /** Relay mode: messages are handled one after another, each waiting for the callback before it. */
      let relayChain = Promise.resolve();
      let settled = false;
      const fail = (err: Error) => {
        settled = true;
        clearTimeout(timer);
        socket.off('data', onData);
        socket.off('close', onClose);
        socket.off('error', onClose);
        reject(err);
      };
      const onClose = (err?: Error) =>
        fail(new ServerConnectError(`server closed the connection during login${err instanceof Error ? `: ${err.message}` : ''}`));
      // An asynchronous callback must not let later messages overtake it: AuthenticationOk and the
      // rest of the login wait until the client has had SASLFinal, and a refusal at the last
      // step still ends the login.
      const relayStep = async (r: RelayedLogin, type: number, message: Buffer): Promise<void> => {
        if (settled) return;
        if (type === Backend.Authentication && message.readInt32BE(5) !== AuthCode.Ok) {
          const answer = await r.authenticate(message);
          if (answer && !settled && !socket.destroyed) socket.write(answer);
          return;
        }
        if (type === Backend.ErrorResponse) {
          const e = decodeError(message, 0, message.length);
          const err = new ServerConnectError(`server refused login: ${e.message}`, e);
          err.rawError = message;
          throw err;
        }
        r.passOn?.(message);
        handleLogin(type, message, 0, message.length);
      };
      const handle = (type: number, buf: Buffer, start: number, end: number) => {
        if (relay) {
          const message = Buffer.from(buf.subarray(start, end));
          relayChain = relayChain.then(() => relayStep(relay, type, message)).catch(fail);
          return;
        }
        handleLogin(type, buf, start, end);
      };
      const handleLogin = (type: number, buf: Buffer, start: number, end: number) => {
        switch (type) {
          case Backend.Authentication: {
            const code = buf.readInt32BE(start + 5);
            if (code === AuthCode.Ok) return;
            if (code === AuthCode.CleartextPassword) {
              if (!credentials.password) throw new ServerConnectError(`server asked for a cleartext password for "${this.user}", and the gateway holds none`);
              socket.write(passwordMessage(credentials.password));
            } else if (code === AuthCode.MD5Password) {
              const hash = credentials.md5Hash ?? (credentials.password !== undefined ? md5PasswordHash(this.user, credentials.password) : undefined);
              if (!hash) throw new ServerConnectError(`server asked for md5 authentication for "${this.user}", and the gateway holds no md5 secret`);
              socket.write(passwordMessage(md5Response(hash, buf.subarray(start + 9, start + 13))));
            } else if (code === AuthCode.SASL) {
              const mechs = buf.toString('utf8', start + 9, end).split('\0');
              if (!mechs.includes(SCRAM_SHA_256)) throw new ServerConnectError(`server offers no supported SASL mechanism (${mechs.filter(Boolean).join(', ')})`);
              if (credentials.scramKeys) scram = new ScramClientExchange(credentials.scramKeys);
              else if (credentials.password !== undefined) scram = new ScramClientExchange({ password: credentials.password });
              else throw new ServerConnectError(`server asked for SCRAM authentication for "${this.user}", and the gateway holds no SCRAM keys`);
              socket.write(saslInitialResponse(SCRAM_SHA_256, scram.clientFirst()));
            } else if (code === AuthCode.SASLContinue) {
              if (!scram) throw new ServerConnectError('unexpected SASLContinue');
              socket.write(saslResponse(scram.handleServerFirst(buf.toString('utf8', start + 9, end))));
            } else if (code === AuthCode.SASLFinal) {
              if (!scram) throw new ServerConnectError('unexpected SASLFinal');
              scram.verifyServerFinal(buf.toString('utf8', start + 9, end));
            } else {
              throw new ServerConnectError(`unsupported authentication request ${code} from server`);
            }
            return;
          }
          case Backend.ErrorResponse: {
            const e = decodeError(buf, start, end);
            throw new ServerConnectError(`server refused login: ${e.message}`, e);
          }
          case Backend.ParameterStatus: {
            const [k, v] = decodeParameterStatus(buf, start, end);
            this.params.set(k, v);
            return;
          }
          case Backend.BackendKeyData:
            this.processId = buf.readInt32BE(start + 5);
            this.secretKey = Buffer.from(buf.subarray(start + 9, end));
            return;
          case Backend.ReadyForQuery:
            this.txStatus = buf[start + 5];
            settled = true;
            clearTimeout(timer);
            socket.off('data', onData);
            socket.off('close', onClose);
            socket.off('error', onClose);
            socket.pause();
            resolve();
            return;
          default:
            return; // NoticeResponse, NegotiateProtocolVersion: nothing to do
        }
      };
      const onData = (chunk: Buffer) => {
        try {
          framer.push(chunk, handle);
        } catch (err) {
          fail(err instanceof ServerConnectError ? err : new ServerConnectError(`server login failed: ${(err as Error).message}`));
        }
      };
      socket.on('data', onData);
      socket.once('close', onClose);
      socket.once('error', onClose);
    });
  }

  private attach(): void {
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    this.socket.on('error', (err) => this.log.debug({ server: this.id, err: err.message }, 'server socket error'));
    this.socket.once('close', () => {
      this.closed = true;
      this.onClose(this);
      for (const l of this.closeListeners) l(this);
    });
    this.socket.resume();
  }

  cancelSent(): void {
    this.cancelsInFlight++;
  }

  /** The cancel connection closed: PostgreSQL has read the request. */
  cancelLanded(): void {
    if (--this.cancelsInFlight > 0) return;
    const next = this.afterCancels;
    this.afterCancels = null;
    next?.();
  }

  /** Calls `fn` once no cancel for this connection is in flight (at once if none is). */
  whenCancelsLanded(fn: () => void): void {
    if (this.cancelsInFlight === 0) fn();
    else this.afterCancels = fn;
  }

  /** DISCARD ALL / DEALLOCATE ALL ran: no prepared statement is left on the server. */
  forgetPrepared(): void {
    this.prepared.clear();
    this.gatewayStatements.clear();
  }

  addCloseListener(listener: (conn: ServerConnection) => void): void {
    this.closeListeners.push(listener);
  }

  write(data: Buffer): boolean {
    return this.socket.write(data);
  }

  /** Polite close: Terminate, then end the socket. */
  terminate(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.socket.writable) this.socket.end(terminateMessage());
    else this.socket.destroy();
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }

  /**
   * Runs SQL on this connection while no client owns it (reset, health check, auth query).
   * Simple protocol without parameters; with parameters, the extended protocol (text values).
   * Rejects with the server's error; the connection stays usable after an ERROR.
   */
  internalQuery(sql: string, params?: (string | null)[], timeoutMs = 10_000): Promise<InternalQueryResult> {
    return new Promise((resolve, reject) => {
      const result: InternalQueryResult = { rows: [], tags: [] };
      let error: ServerError | undefined;
      const timer = setTimeout(() => {
        this.destroy();
        reject(new ServerConnectError('timeout running internal query on server connection'));
      }, timeoutMs);
      const prevData = this.onData;
      const prevClose = this.onClose;
      const done = () => {
        clearTimeout(timer);
        this.onData = prevData;
        this.onClose = prevClose;
      };
      this.onClose = (conn) => {
        done();
        reject(new ServerConnectError('server connection closed during internal query'));
        prevClose(conn);
      };
      this.onData = (chunk) => {
        try {
          this.framer.push(chunk, (type, buf, start, end) => {
            if (type === Backend.DataRow) result.rows.push(decodeDataRow(buf, start, end));
            else if (type === Backend.CommandComplete) result.tags.push(buf.toString('latin1', start + 5, end - 1));
            else if (type === Backend.ErrorResponse) error ??= decodeError(buf, start, end);
            else if (type === Backend.NotificationResponse) this.onNotification?.();
            else if (type === Backend.ParameterStatus) {
              const [k, v] = decodeParameterStatus(buf, start, end);
              this.params.set(k, v);
            } else if (type === Backend.ReadyForQuery) {
              this.txStatus = buf[start + 5];
              done();
              if (error) reject(Object.assign(new Error(error.message), { serverError: error }));
              else resolve(result);
            }
          });
        } catch (err) {
          done();
          this.destroy();
          reject(err);
        }
      };
      this.write(params ? parseMessageForInternalQuery(sql, params) : queryMessage(sql));
    });
  }
}

function noop(): void {}

/** Forgets which client parameters are in effect (after RESET ALL / DISCARD ALL). */
export function clearAppliedParams(server: ServerConnection): void {
  server.appliedParams.clear();
  server.appliedParamsKey = null;
  // The same resets (RESET ALL, SET SESSION AUTHORIZATION DEFAULT) clear the identity too.
  server.identityKey = '';
  server.sessionIdentityKey = '';
}

function decodeDataRow(buf: Buffer, start: number, end: number): (string | null)[] {
  const n = buf.readInt16BE(start + 5);
  const row: (string | null)[] = [];
  let pos = start + 7;
  for (let i = 0; i < n && pos < end; i++) {
    const len = buf.readInt32BE(pos);
    pos += 4;
    if (len < 0) row.push(null);
    else {
      row.push(buf.toString('utf8', pos, pos + len));
      pos += len;
    }
  }
  return row;
}

/** Bytes a read may fill at most; a slab with less room left than MIN_READ is replaced. */
const SLAB_BYTES = 64 * 1024;
const MIN_READ = 8 * 1024;

/**
 * Reads into per-connection slabs (Node's `onread`), skipping the Readable stream machinery on
 * the hot path. Each read lands after the previous one in the slab and is never overwritten, so
 * chunks stay valid while the relay forwards slices of them. The chunk is still delivered as a
 * 'data' event, so every consumer of the socket works unchanged.
 */
function slabReader(): { buffer: () => Buffer; callback: (n: number, buf: Uint8Array) => boolean; socket?: Socket } {
  let slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
  let offset = 0;
  let windowStart = 0;
  const reader = {
    socket: undefined as Socket | undefined,
    buffer: () => {
      if (SLAB_BYTES - offset < MIN_READ) {
        slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
        offset = 0;
      }
      windowStart = offset;
      return slab.subarray(offset);
    },
    callback: (n: number) => {
      const chunk = slab.subarray(windowStart, windowStart + n);
      offset = windowStart + n;
      reader.socket!.emit('data', chunk);
      return true; // flow control stays with socket.pause()/resume()
    },
  };
  return reader;
}

function openSocket(endpoint: ServerEndpoint): Promise<Socket> {
  return new Promise((resolve, reject) => {
    // A TLS upgrade needs the socket's ordinary read path: slabs only for plain connections.
    const reader = endpoint.tls.mode === 'disable' ? slabReader() : null;
    const socket = net.connect({ host: endpoint.host, port: endpoint.port, ...(reader ? { onread: reader } : {}) });
    if (reader) reader.socket = socket;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new ServerConnectError(`timeout connecting to ${endpoint.host}:${endpoint.port}`));
    }, endpoint.connectTimeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', onError);
      resolve(socket);
    });
    const onError = (err: Error) => {
      clearTimeout(timer);
      reject(new ServerConnectError(`could not connect to server ${endpoint.host}:${endpoint.port}: ${err.message}`));
    };
    socket.once('error', onError);
  });
}
