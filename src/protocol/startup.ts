/**
 * Startup-phase packets: untyped, Int32 length then Int32 code (protocol version or a request code).
 * Pure: bytes in, a decoded packet out.
 */
import { CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE } from './constants.js';

/** PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_PACKET_LENGTH = 10000;

export type StartupPacket =
  | { kind: 'ssl' }
  | { kind: 'gssenc' }
  | { kind: 'cancel'; processId: number; secretKey: Buffer }
  | { kind: 'startup'; major: number; minor: number; params: Map<string, string>; options: Map<string, string> };

export class StartupError extends Error {
  /** SQLSTATE for the FATAL sent to the client: protocol violation unless said otherwise. */
  constructor(
    message: string,
    readonly sqlState = '08P01',
  ) {
    super(message);
    this.name = 'StartupError';
  }
}

/**
 * Returns the length of the first startup packet in `buf` once it is complete, 0 if more bytes
 * are needed. Throws StartupError for an impossible length.
 */
export function startupPacketLength(buf: Buffer): number {
  if (buf.length < 4) return 0;
  const len = buf.readInt32BE(0);
  if (len < 8 || len > MAX_STARTUP_PACKET_LENGTH) throw new StartupError(`invalid length of startup packet: ${len}`);
  return buf.length >= len ? len : 0;
}

/** Decodes one complete startup packet (exactly `packet.length` bytes). */
export function decodeStartupPacket(packet: Buffer): StartupPacket {
  const len = packet.readInt32BE(0);
  if (len !== packet.length) throw new StartupError('startup packet length mismatch');
  const code = packet.readInt32BE(4);
  if (code === SSL_REQUEST_CODE) {
    if (len !== 8) throw new StartupError('invalid SSLRequest length');
    return { kind: 'ssl' };
  }
  if (code === GSSENC_REQUEST_CODE) {
    if (len !== 8) throw new StartupError('invalid GSSENCRequest length');
    return { kind: 'gssenc' };
  }
  if (code === CANCEL_REQUEST_CODE) {
    // Protocol 3.2 allows secret keys of up to 256 bytes; 3.0 uses 4.
    if (len < 16 || len > 12 + 256) throw new StartupError('invalid CancelRequest length');
    return { kind: 'cancel', processId: packet.readInt32BE(8), secretKey: Buffer.from(packet.subarray(12, len)) };
  }
  const major = code >>> 16;
  const minor = code & 0xffff;
  if (major !== 3) throw new StartupError(`unsupported frontend protocol ${major}.${minor}: server supports 3.0 to 3.2`, '0A000');
  const params = new Map<string, string>();
  const options = new Map<string, string>();
  let pos = 8;
  for (;;) {
    if (pos >= len) throw new StartupError('startup packet is not terminated');
    if (packet[pos] === 0) {
      if (pos !== len - 1) throw new StartupError('invalid startup packet layout: expected terminator as last byte');
      break;
    }
    const nameEnd = packet.indexOf(0, pos);
    if (nameEnd < 0 || nameEnd >= len - 1) throw new StartupError('invalid startup packet layout: parameter without value');
    const valueEnd = packet.indexOf(0, nameEnd + 1);
    if (valueEnd < 0 || valueEnd >= len) throw new StartupError('invalid startup packet layout: unterminated value');
    const name = packet.toString('utf8', pos, nameEnd);
    const value = packet.toString('utf8', nameEnd + 1, valueEnd);
    // "_pq_." names are protocol options, negotiated separately from run-time parameters.
    if (name.startsWith('_pq_.')) options.set(name, value);
    else params.set(name, value);
    pos = valueEnd + 1;
  }
  return { kind: 'startup', major, minor, params, options };
}
