/**
 * The client's first packets, before any typed message: SSLRequest (→ TLS), GSSENCRequest
 * (answered N), CancelRequest (handed to the cancel registry) and the StartupMessage.
 */
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { decodeStartupPacket, startupPacketLength, StartupError, type StartupPacket } from '../protocol/startup.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';

export type StartupMessage = Extract<StartupPacket, { kind: 'startup' }>;
export type CancelPacket = Extract<StartupPacket, { kind: 'cancel' }>;

export type PrologueResult =
  | { kind: 'startup'; socket: Socket; startup: StartupMessage; leftover: Buffer | null; tls: boolean }
  | { kind: 'cancel'; socket: Socket; cancel: CancelPacket };

export interface PrologueOptions {
  /** Secure context when TLS is offered to clients; null answers SSLRequest with N. */
  tlsContext: tls.SecureContext | null;
  requestCert: boolean;
}

/** Reads one startup-phase packet from `socket`. Resolves with the packet and any extra bytes. */
function readPacket(socket: Socket): Promise<{ packet: Buffer; rest: Buffer | null }> {
  return new Promise((resolve, reject) => {
    let acc: Buffer | null = null;
    const onData = (chunk: Buffer) => {
      acc = acc ? Buffer.concat([acc, chunk]) : chunk;
      let len: number;
      try {
        len = startupPacketLength(acc);
      } catch (err) {
        cleanup();
        reject(err);
        return;
      }
      if (len === 0) {
        if (acc.length > 10_000) {
          cleanup();
          reject(new StartupError('startup packet too long'));
        }
        return;
      }
      cleanup();
      resolve({ packet: acc.subarray(0, len), rest: acc.length > len ? acc.subarray(len) : null });
    };
    const onEnd = () => {
      cleanup();
      reject(new StartupError('connection closed before the startup packet was complete'));
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
    socket.resume();
  });
}

function upgradeToTls(socket: Socket, options: PrologueOptions): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const tlsSocket = new tls.TLSSocket(socket, {
      isServer: true,
      secureContext: options.tlsContext!,
      requestCert: options.requestCert,
      rejectUnauthorized: false, // client certificates are checked by the auth step, not by the handshake
    });
    const onError = (err: Error) => reject(new StartupError(`TLS handshake failed: ${err.message}`));
    tlsSocket.once('error', onError);
    tlsSocket.once('secure', () => {
      tlsSocket.off('error', onError);
      resolve(tlsSocket);
    });
  });
}

/**
 * Runs the prologue. Throws PgError (to be sent as FATAL where the socket still speaks plain
 * protocol) or StartupError for garbage.
 */
export async function runPrologue(socket: Socket, options: PrologueOptions): Promise<PrologueResult> {
  let current: Socket = socket;
  let secured = false;
  let triedGss = false;
  for (;;) {
    const { packet, rest } = await readPacket(current);
    const decoded = decodeStartupPacket(packet);
    if (decoded.kind === 'ssl') {
      if (secured) throw new PgError(SqlState.ProtocolViolation, 'SSLRequest received on an encrypted connection', 'FATAL');
      if (rest) {
        // Bytes sent before the handshake could be injected by a man in the middle (CVE-2021-23214).
        throw new PgError(SqlState.ProtocolViolation, 'received unencrypted data after SSL request', 'FATAL');
      }
      if (!options.tlsContext) {
        current.write('N');
        continue;
      }
      current.write('S');
      current = await upgradeToTls(current, options);
      secured = true;
      continue;
    }
    if (decoded.kind === 'gssenc') {
      if (rest) throw new PgError(SqlState.ProtocolViolation, 'received unencrypted data after GSSAPI encryption request', 'FATAL');
      if (triedGss || secured) throw new PgError(SqlState.ProtocolViolation, 'unexpected GSSENCRequest', 'FATAL');
      triedGss = true;
      current.write('N');
      continue;
    }
    if (decoded.kind === 'cancel') return { kind: 'cancel', socket: current, cancel: decoded };
    return { kind: 'startup', socket: current, startup: decoded, leftover: rest, tls: secured };
  }
}
