/**
 * The client's first packets, before any typed message: SSLRequest (→ TLS, terminated here or
 * passed through), PostgreSQL 17+ direct TLS, GSSENCRequest, CancelRequest and the StartupMessage.
 *
 * For TLS passthrough the ClientHello is read without being consumed: its SNI server name picks
 * the route, and the same bytes are replayed to the chosen server (or fed to trustgate's own TLS).
 */
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { decodeStartupPacket, startupPacketLength, StartupError, type StartupPacket } from '../protocol/startup.js';
import { looksLikeTls, parseClientHello } from '../protocol/tls-client-hello.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';

export type StartupMessage = Extract<StartupPacket, { kind: 'startup' }>;
export type CancelPacket = Extract<StartupPacket, { kind: 'cancel' }>;

/** A server that terminates the client's TLS (or GSSAPI encryption) itself. */
export interface PassthroughTarget {
  host: string;
  port: number;
}

/** How the encrypted session is opened towards the server: SSLRequest, direct TLS, or GSSENCRequest. */
export type PassthroughNegotiation = 'ssl' | 'direct' | 'gssenc';

export type PrologueResult =
  | { kind: 'startup'; socket: Socket; startup: StartupMessage; leftover: Buffer | null; tls: boolean }
  | { kind: 'cancel'; socket: Socket; cancel: CancelPacket }
  | {
      kind: 'passthrough';
      socket: Socket;
      target: PassthroughTarget;
      negotiation: PassthroughNegotiation;
      /** Bytes read from the client that the server must get first (ClientHello, or GSSENCRequest). */
      initial: Buffer;
      serverName: string | null;
    };

/** What a TLS client gets, decided from its ClientHello. */
export type TlsRoute =
  | { kind: 'passthrough'; target: PassthroughTarget }
  | { kind: 'terminate' }
  | { kind: 'refuse'; alert: TlsAlert; reason: string };

export interface PrologueOptions {
  /** Secure context when TLS is offered to clients; null answers SSLRequest with N (unless routed). */
  tlsContext: tls.SecureContext | null;
  requestCert: boolean;
  /**
   * Routes TLS clients by server name. Null when nothing is passed through: TLS is then
   * terminated without looking at the ClientHello.
   */
  routeTls: ((serverName: string | null) => TlsRoute) | null;
  /** A passthrough listener: unencrypted sessions are refused (nothing is forwarded in clear). */
  passthroughOnly: boolean;
  /** Where a GSSENCRequest is relayed (passthrough listener with gssenc on); null answers N. */
  gssencTarget: PassthroughTarget | null;
  /** Called once the client was told to start TLS: from then on no plain message may be written to the raw socket. */
  onEncryptionStarted?: () => void;
}

/** TLS alert descriptions (RFC 8446 §6.2) sent when a TLS client is turned away. */
export const enum TlsAlert {
  HandshakeFailure = 40,
  InternalError = 80,
  UnrecognizedName = 112,
  NoApplicationProtocol = 120,
}

/** A fatal TLS alert record, the only thing a client that started TLS can still understand. */
export function tlsAlert(description: TlsAlert): Buffer {
  return Buffer.from([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]);
}

/**
 * The connection was turned away where no PostgreSQL message can be sent any more (the client
 * expects TLS): an alert or nothing was sent and the socket is closed.
 */
export class ConnectionRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConnectionRefused';
  }
}

/** ALPN protocol PostgreSQL requires for direct TLS. */
const ALPN_POSTGRESQL = 'postgresql';

/**
 * Reads from `socket` (after `initial`) until `check` makes something of the bytes so far: a
 * result, or a thrown error. Rejects with `ended()` if the socket ends first. Leaves the socket
 * paused with nothing consumed beyond what `check` was given.
 */
function readUntil<T>(socket: Socket, initial: Buffer | null, check: (bytes: Buffer) => T | undefined, ended: () => Error): Promise<T> {
  return new Promise((resolve, reject) => {
    let acc = initial ?? Buffer.alloc(0);
    const attempt = (): boolean => {
      let result: T | undefined;
      try {
        result = check(acc);
      } catch (err) {
        cleanup();
        reject(err);
        return true;
      }
      if (result === undefined) return false;
      cleanup();
      resolve(result);
      return true;
    };
    const onData = (chunk: Buffer) => {
      acc = acc.length === 0 ? chunk : Buffer.concat([acc, chunk]);
      attempt();
    };
    const onEnd = () => {
      cleanup();
      reject(ended());
    };
    const cleanup = () => {
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.pause();
    };
    socket.on('data', onData);
    socket.once('end', onEnd);
    socket.once('close', onEnd);
    if (!(initial && attempt())) socket.resume();
  });
}

/**
 * Reads one startup-phase packet from `socket`, or — when `allowTls` and the first byte opens a
 * TLS record — the raw bytes read so far (direct TLS).
 */
function readPacket(socket: Socket, allowTls: boolean): Promise<{ packet: Buffer; rest: Buffer | null } | { tls: Buffer }> {
  return readUntil(
    socket,
    null,
    (acc) => {
      if (allowTls && looksLikeTls(acc[0])) return { tls: acc };
      const len = startupPacketLength(acc);
      if (len === 0) {
        if (acc.length > 10_000) throw new StartupError('startup packet too long');
        return undefined;
      }
      return { packet: acc.subarray(0, len), rest: acc.length > len ? acc.subarray(len) : null };
    },
    () => new StartupError('connection closed before the startup packet was complete'),
  );
}

/** Reads until `initial` + more bytes hold a whole ClientHello; rejects for anything else. */
function readClientHello(socket: Socket, initial: Buffer | null): Promise<{ bytes: Buffer; serverName: string | null; alpn: string[] }> {
  return readUntil(
    socket,
    initial,
    (acc) => {
      const r = parseClientHello(acc);
      if (r.kind === 'incomplete') return undefined;
      if (r.kind === 'not-tls') throw new ConnectionRefused(`expected a TLS ClientHello: ${r.reason}`);
      return { bytes: acc, serverName: r.serverName, alpn: r.alpn };
    },
    () => new ConnectionRefused('connection closed before the TLS ClientHello was complete'),
  );
}

function upgradeToTls(socket: Socket, options: PrologueOptions): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const tlsSocket = new tls.TLSSocket(socket, {
      isServer: true,
      secureContext: options.tlsContext!,
      requestCert: options.requestCert,
      rejectUnauthorized: false, // client certificates are checked by the auth step, not by the handshake
      // Direct TLS requires it; libpq 17+ also sends it after SSLRequest.
      ALPNProtocols: [ALPN_POSTGRESQL],
    });
    const onError = (err: Error) => reject(new StartupError(`TLS handshake failed: ${err.message}`));
    tlsSocket.once('error', onError);
    tlsSocket.once('secure', () => {
      tlsSocket.off('error', onError);
      resolve(tlsSocket);
    });
  });
}

/** Sends `alert` (if any) and closes: the client is past the point where it reads PostgreSQL errors. */
function refuseTls(socket: Socket, alert: TlsAlert | null, reason: string): never {
  if (alert !== null && socket.writable) socket.end(tlsAlert(alert));
  else socket.end();
  setTimeout(() => socket.destroy(), 1000).unref();
  throw new ConnectionRefused(reason);
}

/**
 * Runs the prologue. Throws PgError (to be sent as FATAL where the socket still speaks plain
 * protocol), StartupError for garbage, or ConnectionRefused when the socket was already closed.
 */
export async function runPrologue(socket: Socket, options: PrologueOptions): Promise<PrologueResult> {
  let current: Socket = socket;
  let secured = false;
  let triedGss = false;
  for (;;) {
    const read = await readPacket(current, !secured);
    if ('tls' in read) {
      options.onEncryptionStarted?.();
      // PostgreSQL 17+ direct TLS: no SSLRequest, the ClientHello comes first and must ask for ALPN "postgresql".
      const hello = await readHelloOrRefuse(current, read.tls);
      if (!hello.alpn.includes(ALPN_POSTGRESQL)) {
        refuseTls(current, TlsAlert.NoApplicationProtocol, 'direct TLS without ALPN "postgresql"');
      }
      const routed = await routeTlsClient(current, hello, 'direct', options);
      if (routed.kind === 'passthrough') return routed;
      current = routed.socket;
      secured = true;
      continue;
    }
    const { packet, rest } = read;
    const decoded = decodeStartupPacket(packet);
    if (decoded.kind === 'ssl') {
      if (secured) throw new PgError(SqlState.ProtocolViolation, 'SSLRequest received on an encrypted connection', 'FATAL');
      if (rest) {
        // Bytes sent before the handshake could be injected by a man in the middle (CVE-2021-23214).
        throw new PgError(SqlState.ProtocolViolation, 'received unencrypted data after SSL request', 'FATAL');
      }
      if (!options.routeTls) {
        if (!options.tlsContext) {
          current.write('N');
          continue;
        }
        current.write('S');
        options.onEncryptionStarted?.();
        current = await upgradeToTls(current, options);
        secured = true;
        continue;
      }
      current.write('S');
      options.onEncryptionStarted?.();
      const hello = await readHelloOrRefuse(current, null);
      const routed = await routeTlsClient(current, hello, 'ssl', options);
      if (routed.kind === 'passthrough') return routed;
      current = routed.socket;
      secured = true;
      continue;
    }
    if (decoded.kind === 'gssenc') {
      if (rest) throw new PgError(SqlState.ProtocolViolation, 'received unencrypted data after GSSAPI encryption request', 'FATAL');
      if (triedGss || secured) throw new PgError(SqlState.ProtocolViolation, 'unexpected GSSENCRequest', 'FATAL');
      triedGss = true;
      if (options.gssencTarget) {
        return { kind: 'passthrough', socket: current, target: options.gssencTarget, negotiation: 'gssenc', initial: Buffer.from(packet), serverName: null };
      }
      current.write('N');
      continue;
    }
    if (decoded.kind === 'cancel') return { kind: 'cancel', socket: current, cancel: decoded };
    if (options.passthroughOnly && !secured) {
      throw new PgError(
        SqlState.InvalidAuthorizationSpecification,
        'this trustgate listener passes TLS through to PostgreSQL and accepts no unencrypted sessions: connect with sslmode=require or stronger',
        'FATAL',
      );
    }
    return { kind: 'startup', socket: current, startup: decoded, leftover: rest, tls: secured };
  }
}

async function readHelloOrRefuse(socket: Socket, initial: Buffer | null): Promise<{ bytes: Buffer; serverName: string | null; alpn: string[] }> {
  try {
    return await readClientHello(socket, initial);
  } catch (err) {
    // Not TLS where TLS was promised: close without reading or forwarding anything.
    refuseTls(socket, null, (err as Error).message);
  }
}

/** Applies the route of a TLS client: passthrough (result), or trustgate's own TLS (the TLS socket). */
async function routeTlsClient(
  socket: Socket,
  hello: { bytes: Buffer; serverName: string | null },
  negotiation: PassthroughNegotiation,
  options: PrologueOptions,
): Promise<Extract<PrologueResult, { kind: 'passthrough' }> | { kind: 'terminated'; socket: tls.TLSSocket }> {
  const route: TlsRoute = options.routeTls ? options.routeTls(hello.serverName) : { kind: 'terminate' };
  if (route.kind === 'refuse') refuseTls(socket, route.alert, route.reason);
  if (route.kind === 'passthrough') {
    return { kind: 'passthrough', socket, target: route.target, negotiation, initial: hello.bytes, serverName: hello.serverName };
  }
  if (!options.tlsContext) refuseTls(socket, TlsAlert.UnrecognizedName, 'no passthrough route for this server name, and trustgate terminates no TLS');
  // Hand the bytes already read back to the socket: the TLS layer reads them first.
  socket.unshift(hello.bytes);
  return { kind: 'terminated', socket: await upgradeToTls(socket, options) };
}
