/**
 * Reads the TLS ClientHello at the start of a client's byte stream without consuming it.
 *
 * Used for TLS passthrough: after the gateway answered SSLRequest with 'S' (or when a PostgreSQL
 * 17+ client opens with "direct TLS", first byte 0x16), the gateway peeks at the ClientHello to
 * learn the SNI server name and the ALPN protocols, picks a server, and replays the same bytes.
 *
 * Pure: bytes in, result out, no I/O. The caller keeps buffering while the result is
 * 'incomplete' and re-parses the whole buffer; every length is bounds-checked, so malformed input
 * yields 'not-tls' with a reason and never throws or reads out of range.
 */

export type ClientHelloResult =
  /** Not enough bytes yet; `need` is the smallest total byte count known to be required. */
  | { kind: 'incomplete'; need: number }
  /** Not a TLS handshake record, not a ClientHello, malformed, or larger than allowed. */
  | { kind: 'not-tls'; reason: string }
  /**
   * A complete, well-formed ClientHello. `length` is the total bytes of all TLS records it
   * occupied (headers included) — the prefix of `data` to replay. `alpn` names are decoded as
   * latin1 (one char per byte); `serverName` is the first host_name, lower-cased, or null.
   */
  | { kind: 'hello'; serverName: string | null; alpn: string[]; length: number; legacyVersion: number };

const RECORD_HEADER = 5;
const HANDSHAKE_HEADER = 4;
const CONTENT_HANDSHAKE = 0x16;
const HANDSHAKE_CLIENT_HELLO = 1;
/** TLSPlaintext.length must not exceed 2^14 (RFC 8446 §5.1). */
const MAX_RECORD_PAYLOAD = 16 * 1024;
const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
const SNI_HOST_NAME = 0;

/** True when a connection's first byte starts a TLS handshake record (direct TLS). */
export function looksLikeTls(firstByte: number): boolean {
  return firstByte === CONTENT_HANDSHAKE;
}

/** Parses the ClientHello at the start of `data` (it may span several TLS records). */
export function parseClientHello(data: Buffer, maxBytes = MAX_RECORD_PAYLOAD + RECORD_HEADER): ClientHelloResult {
  if (data.length === 0) return RECORD_HEADER > maxBytes ? tooLarge() : { kind: 'incomplete', need: RECORD_HEADER };
  if (!looksLikeTls(data[0])) return notTls('not a TLS handshake record');

  const fragments: Buffer[] = [];
  let hsHave = 0; // handshake bytes from complete records
  let hsNeed = -1; // 4 + ClientHello body length, once known
  let pos = 0;

  for (;;) {
    if (pos + RECORD_HEADER > data.length) {
      const bad = checkRecordHeaderPrefix(data, pos, data.length);
      if (bad) return notTls(bad);
      const need = pos + RECORD_HEADER + (hsNeed >= 0 ? hsNeed : HANDSHAKE_HEADER) - hsHave;
      return need > maxBytes ? tooLarge() : { kind: 'incomplete', need };
    }
    const bad = checkRecordHeaderPrefix(data, pos, pos + RECORD_HEADER);
    if (bad) return notTls(bad);
    const recLen = data.readUInt16BE(pos + 3);
    if (recLen === 0) return notTls('empty handshake record');
    if (recLen > MAX_RECORD_PAYLOAD) return notTls(`TLS record too long (${recLen})`);
    const end = pos + RECORD_HEADER + recLen;
    if (end > maxBytes) return tooLarge();
    const fragment = data.subarray(pos + RECORD_HEADER, Math.min(end, data.length));

    if (hsNeed < 0) {
      const header = peekHandshakeHeader(fragments, fragment);
      if (header.length >= 1 && header[0] !== HANDSHAKE_CLIENT_HELLO) {
        return notTls(`handshake message type ${header[0]} is not ClientHello`);
      }
      if (header.length === HANDSHAKE_HEADER) {
        hsNeed = HANDSHAKE_HEADER + header.readUIntBE(1, 3);
      }
    }

    if (end > data.length) {
      // Bytes still missing from this record, plus any further record the message needs.
      const beyond = hsNeed >= 0 ? hsNeed - hsHave - recLen : 0;
      const need = beyond > 0 ? end + RECORD_HEADER + beyond : end;
      return need > maxBytes ? tooLarge() : { kind: 'incomplete', need };
    }
    fragments.push(fragment);
    hsHave += recLen;
    pos = end;
    if (hsNeed >= 0 && hsHave >= hsNeed) break;
  }

  const handshake = fragments.length === 1 ? fragments[0] : Buffer.concat(fragments, hsHave);
  const body = parseBody(handshake.subarray(HANDSHAKE_HEADER, hsNeed));
  if (typeof body === 'string') return notTls(body);
  return { kind: 'hello', ...body, length: pos };
}

function notTls(reason: string): ClientHelloResult {
  return { kind: 'not-tls', reason };
}

function tooLarge(): ClientHelloResult {
  return notTls('ClientHello too large');
}

/** Validates the bytes of a record header at `pos` that lie before `limit`; returns a reason or null. */
function checkRecordHeaderPrefix(data: Buffer, pos: number, limit: number): string | null {
  if (pos < limit && data[pos] !== CONTENT_HANDSHAKE) return `unexpected TLS record type ${data[pos]} inside ClientHello`;
  if (pos + 1 < limit && data[pos + 1] !== 3) return 'unsupported TLS record version';
  if (pos + 2 < limit && (data[pos + 2] < 1 || data[pos + 2] > 4)) return 'unsupported TLS record version';
  return null;
}

/** Up to the first 4 handshake bytes, from complete fragments plus the (possibly partial) current one. */
function peekHandshakeHeader(fragments: Buffer[], current: Buffer): Buffer {
  const out: number[] = [];
  for (const part of [...fragments, current]) {
    for (let i = 0; i < part.length && out.length < HANDSHAKE_HEADER; i++) out.push(part[i]);
    if (out.length === HANDSHAKE_HEADER) break;
  }
  return Buffer.from(out);
}

class Malformed {
  constructor(readonly reason: string) {}
}

/** Bounds-checked cursor over a slice; every read past the end throws Malformed (caught in parseBody). */
class Reader {
  private pos = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  private need(n: number, field: string): void {
    if (n > this.remaining) throw new Malformed(`truncated ${this.what}: ${field}`);
  }

  u8(field: string): number {
    this.need(1, field);
    return this.buf[this.pos++];
  }

  u16(field: string): number {
    this.need(2, field);
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }

  bytes(n: number, field: string): Buffer {
    this.need(n, field);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
}

interface HelloBody {
  serverName: string | null;
  alpn: string[];
  legacyVersion: number;
}

function parseBody(body: Buffer): HelloBody | string {
  try {
    const r = new Reader(body, 'ClientHello');
    const legacyVersion = r.u16('legacy_version');
    if (legacyVersion >> 8 !== 3) return `unsupported ClientHello version 0x${legacyVersion.toString(16)}`;
    r.bytes(32, 'random');
    const sessionIdLen = r.u8('session_id');
    if (sessionIdLen > 32) return 'session_id too long';
    r.bytes(sessionIdLen, 'session_id');
    const suitesLen = r.u16('cipher_suites');
    if (suitesLen < 2 || suitesLen % 2 !== 0) return 'bad cipher_suites length';
    r.bytes(suitesLen, 'cipher_suites');
    const compressionLen = r.u8('compression_methods');
    if (compressionLen < 1) return 'empty compression_methods';
    r.bytes(compressionLen, 'compression_methods');

    let serverName: string | null = null;
    let alpn: string[] = [];
    if (r.remaining === 0) return { serverName, alpn, legacyVersion }; // no extensions at all
    const extLen = r.u16('extensions');
    if (extLen !== r.remaining) return 'extensions length does not match ClientHello length';
    const exts = new Reader(r.bytes(extLen, 'extensions'), 'extensions');
    const seen = new Set<number>();
    while (exts.remaining > 0) {
      const type = exts.u16('extension type');
      const data = exts.bytes(exts.u16('extension length'), 'extension data');
      if (seen.has(type)) return `duplicate extension ${type}`;
      seen.add(type);
      if (type === EXT_SERVER_NAME) serverName = parseServerName(data);
      else if (type === EXT_ALPN) alpn = parseAlpn(data);
    }
    return { serverName, alpn, legacyVersion };
  } catch (err) {
    if (err instanceof Malformed) return err.reason;
    throw err;
  }
}

function parseServerName(data: Buffer): string | null {
  const r = new Reader(data, 'server_name');
  const listLen = r.u16('server_name_list');
  if (listLen !== r.remaining || listLen === 0) throw new Malformed('bad server_name_list length');
  let first: string | null = null;
  while (r.remaining > 0) {
    const nameType = r.u8('name_type');
    const name = r.bytes(r.u16('name length'), 'name');
    if (nameType === SNI_HOST_NAME && first === null) first = validateHostName(name);
  }
  return first;
}

/** Letters, digits, '-', '_' in non-empty dot-separated labels of ≤ 63 bytes; ≤ 253 bytes in all. */
function validateHostName(name: Buffer): string {
  if (name.length === 0) throw new Malformed('empty server name');
  if (name.length > 253) throw new Malformed('server name too long');
  if (name.includes(0)) throw new Malformed('server name contains NUL');
  let labelLen = 0;
  for (const c of name) {
    if (c === 0x2e) {
      if (labelLen === 0) throw new Malformed('server name has an empty label');
      labelLen = 0;
      continue;
    }
    const ok =
      (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x5f;
    if (!ok) throw new Malformed('server name has an invalid character');
    if (++labelLen > 63) throw new Malformed('server name label too long');
  }
  if (labelLen === 0) throw new Malformed('server name has an empty label');
  return name.toString('latin1').toLowerCase();
}

function parseAlpn(data: Buffer): string[] {
  const r = new Reader(data, 'ALPN');
  const listLen = r.u16('protocol_name_list');
  if (listLen !== r.remaining || listLen < 2) throw new Malformed('bad ALPN list length');
  const out: string[] = [];
  while (r.remaining > 0) {
    const len = r.u8('protocol name length');
    if (len === 0) throw new Malformed('empty ALPN protocol name');
    out.push(r.bytes(len, 'protocol name').toString('latin1'));
  }
  return out;
}
