/**
 * SCRAM-SHA-256 (RFC 5802 / RFC 7677) exactly as PostgreSQL speaks it: no channel
 * binding (gs2 header "n,," or "y,,", i.e. c=biws / c=eSws), no authzid, username
 * attribute ignored (the role comes from the startup packet).
 *
 * Pure: no I/O, only node:crypto. Callers move the SASL payloads over the wire.
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';

export const SCRAM_SHA_256 = 'SCRAM-SHA-256';

/** Key material of a PostgreSQL SCRAM verifier (pg_authid.rolpassword). */
export interface ScramSecret {
  iterations: number;
  salt: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

/**
 * Thrown on any SCRAM failure. `message` is deliberately coarse (safe to relay to a
 * client); `detail` says what actually went wrong (for logs only). `kind` lets the
 * caller pick the SQLSTATE: 'protocol' -> 08P01, 'auth' -> 28P01.
 */
export class ScramError extends Error {
  readonly detail: string;
  readonly kind: 'protocol' | 'auth';
  constructor(kind: 'protocol' | 'auth', detail: string) {
    super(kind === 'auth' ? 'password authentication failed' : 'malformed SCRAM message');
    this.name = 'ScramError';
    this.kind = kind;
    this.detail = detail;
  }
}

const KEY_LEN = 32; // SHA-256 output size
const MAX_ITERATIONS = 10_000_000; // bound the PBKDF2 cost an untrusted server can impose
const DEFAULT_NONCE_BYTES = 18; // same as PostgreSQL / libpq
const B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
// RFC 5802 'printable': %x21-2B / %x2D-7E (any visible ASCII except ',').
const NONCE_RE = /^[\x21-\x2b\x2d-\x7e]+$/;

const sha256 = (data: Buffer): Buffer => createHash('sha256').update(data).digest();
const hmac = (key: Buffer, data: string | Buffer): Buffer => createHmac('sha256', key).update(data).digest();

function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.allocUnsafe(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] ^ b[i];
  return out;
}

/** Constant-time equality that also tolerates length mismatch (length is not secret). */
function safeEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/** Node's base64 decoder is lenient (skips junk); SCRAM fields must be strict. */
function decodeB64(text: string): Buffer | null {
  return B64_RE.test(text) ? Buffer.from(text, 'base64') : null;
}

function parseIterations(text: string): number | null {
  if (!/^[0-9]{1,8}$/.test(text)) return null;
  const n = Number(text);
  return n >= 1 && n <= MAX_ITERATIONS ? n : null;
}

function randomNonce(bytes: number): string {
  return randomBytes(bytes).toString('base64'); // base64 alphabet never contains ','
}

function checkNonce(nonce: string): string {
  if (!NONCE_RE.test(nonce)) throw new TypeError('SCRAM nonce must be printable ASCII without ","');
  return nonce;
}

/** SaltedPassword -> (ClientKey, StoredKey, ServerKey), RFC 5802 §3. */
function deriveKeys(saltedPassword: Buffer): { clientKey: Buffer; storedKey: Buffer; serverKey: Buffer } {
  const clientKey = hmac(saltedPassword, 'Client Key');
  return { clientKey, storedKey: sha256(clientKey), serverKey: hmac(saltedPassword, 'Server Key') };
}

/**
 * PostgreSQL runs SASLprep over the password and falls back to the raw UTF-8 bytes
 * when the password is not valid SASLprep input. We always use the raw UTF-8 bytes:
 * identical for ASCII passwords, and verifiers we create ourselves are consistent with
 * our own client. (Non-ASCII passwords whose NFKC form differs may not match a
 * verifier created by PostgreSQL itself.)
 */
function saltPassword(password: string, salt: Buffer, iterations: number): Buffer {
  return pbkdf2Sync(Buffer.from(password, 'utf8'), salt, iterations, KEY_LEN, 'sha256');
}

/**
 * Split "k=v,k=v,..." into ordered attributes. Values may contain '=' (base64) but
 * never ',' (RFC 5802 escapes it in saslname and forbids it elsewhere).
 */
function parseAttrs(text: string): Array<[string, string]> | null {
  const out: Array<[string, string]> = [];
  for (const part of text.split(',')) {
    if (!/^[A-Za-z]=/.test(part)) return null;
    out.push([part[0], part.slice(2)]);
  }
  return out;
}

/** Parse `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`; null if not that format. */
export function parseScramVerifier(text: string): ScramSecret | null {
  const m = /^SCRAM-SHA-256\$([0-9]+):([^$:]+)\$([^$:]+):([^$:]+)$/.exec(text);
  if (!m) return null;
  const iterations = parseIterations(m[1]);
  const salt = decodeB64(m[2]);
  const storedKey = decodeB64(m[3]);
  const serverKey = decodeB64(m[4]);
  if (iterations === null || !salt || salt.length === 0) return null;
  if (!storedKey || storedKey.length !== KEY_LEN || !serverKey || serverKey.length !== KEY_LEN) return null;
  return { iterations, salt, storedKey, serverKey };
}

/** Build a PostgreSQL-compatible SCRAM verifier (what `ALTER ROLE ... PASSWORD` stores). */
export function makeScramVerifier(password: string, iterations = 4096, salt: Buffer = randomBytes(16)): string {
  if (!Number.isInteger(iterations) || iterations < 1 || iterations > MAX_ITERATIONS) {
    throw new RangeError(`invalid SCRAM iteration count: ${iterations}`);
  }
  if (salt.length === 0) throw new RangeError('SCRAM salt must not be empty');
  const { storedKey, serverKey } = deriveKeys(saltPassword(password, salt, iterations));
  return `${SCRAM_SHA_256}$${iterations}:${salt.toString('base64')}$${storedKey.toString('base64')}:${serverKey.toString('base64')}`;
}

/**
 * Checks a cleartext password against a verifier and returns the SCRAM keys the gateway can log
 * in to the server with (so the password itself need not be kept), or null if it does not match.
 */
export function scramKeysForPassword(password: string, secret: ScramSecret): { clientKey: Buffer; serverKey: Buffer } | null {
  const keys = deriveKeys(saltPassword(password, secret.salt, secret.iterations));
  if (!safeEqual(keys.storedKey, secret.storedKey) || !safeEqual(keys.serverKey, secret.serverKey)) return null;
  return { clientKey: keys.clientKey, serverKey: keys.serverKey };
}

/**
 * Server side of the exchange (the gateway authenticating a connecting client).
 * One instance per authentication attempt; any failure poisons it.
 */
export class ScramServerExchange {
  private readonly secret: ScramSecret;
  private readonly serverNonce: string;
  private state: 'first' | 'final' | 'done' = 'first';
  private gs2Header = '';
  private clientFirstBare = '';
  private serverFirst = '';
  private nonce = '';

  /** `nonce` overrides the random server nonce part (tests only). */
  constructor(secret: ScramSecret, options: { nonceBytes?: number; nonce?: string } = {}) {
    this.secret = secret;
    this.serverNonce = checkNonce(options.nonce ?? randomNonce(options.nonceBytes ?? DEFAULT_NONCE_BYTES));
  }

  private fail(kind: 'protocol' | 'auth', detail: string): never {
    this.state = 'done';
    throw new ScramError(kind, detail);
  }

  handleClientFirst(msg: Buffer): { serverFirst: string } {
    if (this.state !== 'first') this.fail('protocol', 'unexpected client-first-message');
    const text = msg.toString('utf8');
    // gs2-header = cbind-flag "," [authzid] ","
    const m = /^([^,]*),([^,]*),(.*)$/s.exec(text);
    if (!m) this.fail('protocol', 'missing gs2 header');
    const [, cbind, authzid, bare] = m;
    if (cbind.startsWith('p=')) this.fail('protocol', 'client requires channel binding, which is not offered');
    // 'y' = client supports binding but thinks we don't: fine, we really don't offer -PLUS.
    if (cbind !== 'n' && cbind !== 'y') this.fail('protocol', `invalid gs2 channel-binding flag "${cbind}"`);
    if (authzid !== '') this.fail('protocol', 'authorization identity is not supported');
    const attrs = parseAttrs(bare);
    // Reserved "m=" extensions must be rejected; the user name (n=) is ignored like PostgreSQL does.
    if (!attrs || attrs.length < 2 || attrs[0][0] !== 'n' || attrs[1][0] !== 'r') {
      this.fail('protocol', 'expected n= and r= attributes in client-first-message');
    }
    const clientNonce = attrs[1][1];
    if (!NONCE_RE.test(clientNonce)) this.fail('protocol', 'invalid client nonce');

    this.gs2Header = `${cbind},${authzid},`;
    this.clientFirstBare = bare;
    this.nonce = clientNonce + this.serverNonce;
    this.serverFirst = `r=${this.nonce},s=${this.secret.salt.toString('base64')},i=${this.secret.iterations}`;
    this.state = 'final';
    return { serverFirst: this.serverFirst };
  }

  handleClientFinal(msg: Buffer): { serverFinal: string; clientKey: Buffer } {
    if (this.state !== 'final') this.fail('protocol', 'unexpected client-final-message');
    this.state = 'done';
    const text = msg.toString('utf8');
    // The proof must be the last attribute; everything before it is signed.
    const idx = text.lastIndexOf(',p=');
    if (idx < 0) this.fail('protocol', 'missing proof in client-final-message');
    const withoutProof = text.slice(0, idx);
    const attrs = parseAttrs(withoutProof);
    if (!attrs || attrs.length < 2 || attrs[0][0] !== 'c' || attrs[1][0] !== 'r') {
      this.fail('protocol', 'expected c= and r= attributes in client-final-message');
    }
    const cbind = decodeB64(attrs[0][1]);
    if (!cbind || !cbind.equals(Buffer.from(this.gs2Header, 'utf8'))) {
      this.fail('protocol', 'channel binding data does not match gs2 header');
    }
    if (attrs[1][1] !== this.nonce) this.fail('protocol', 'nonce mismatch');
    const proof = decodeB64(text.slice(idx + 3));
    if (!proof || proof.length !== KEY_LEN) this.fail('protocol', 'malformed client proof');

    const authMessage = `${this.clientFirstBare},${this.serverFirst},${withoutProof}`;
    const clientKey = xor(proof, hmac(this.secret.storedKey, authMessage));
    if (!safeEqual(sha256(clientKey), this.secret.storedKey)) this.fail('auth', 'client proof does not match StoredKey');

    const serverSignature = hmac(this.secret.serverKey, authMessage);
    return { serverFinal: `v=${serverSignature.toString('base64')}`, clientKey };
  }
}

/**
 * Client side (the gateway authenticating to PostgreSQL). With `{ clientKey, serverKey }`
 * it logs in without the password, like PgBouncer's SCRAM passthrough: the keys recovered
 * from a client's proof are valid for any server whose verifier has the same salt and
 * iteration count (true when the secret was fetched from that server).
 */
export class ScramClientExchange {
  private readonly clientNonce: string;
  private readonly user: string;
  private readonly password: string | undefined;
  private clientKey: Buffer | undefined;
  private serverKey: Buffer | undefined;
  private expectedServerSignature: Buffer | undefined;
  private state: 'init' | 'first' | 'final' | 'done' = 'init';

  /**
   * `nonce` overrides the random client nonce and `user` the (ignored by PostgreSQL)
   * n= attribute; both exist for RFC test vectors.
   */
  constructor(
    credentials: { password: string } | { clientKey: Buffer; serverKey: Buffer },
    options: { nonceBytes?: number; nonce?: string; user?: string } = {},
  ) {
    if ('password' in credentials) {
      this.password = credentials.password;
    } else {
      if (credentials.clientKey.length !== KEY_LEN || credentials.serverKey.length !== KEY_LEN) {
        throw new RangeError('SCRAM clientKey and serverKey must be 32 bytes');
      }
      this.clientKey = credentials.clientKey;
      this.serverKey = credentials.serverKey;
    }
    this.clientNonce = checkNonce(options.nonce ?? randomNonce(options.nonceBytes ?? DEFAULT_NONCE_BYTES));
    // saslname escaping (RFC 5802 §5.1): ',' and '=' must be encoded.
    this.user = (options.user ?? '').replace(/=/g, '=3D').replace(/,/g, '=2C');
  }

  private fail(kind: 'protocol' | 'auth', detail: string): never {
    this.state = 'done';
    throw new ScramError(kind, detail);
  }

  private get clientFirstBare(): string {
    return `n=${this.user},r=${this.clientNonce}`;
  }

  /** The SASLInitialResponse payload. */
  clientFirst(): string {
    if (this.state !== 'init') this.fail('protocol', 'clientFirst() called twice');
    this.state = 'first';
    return `n,,${this.clientFirstBare}`;
  }

  /** Takes the server-first-message, returns the client-final-message (SASLResponse payload). */
  handleServerFirst(msg: string): string {
    if (this.state !== 'first') this.fail('protocol', 'unexpected server-first-message');
    const attrs = parseAttrs(msg);
    if (!attrs || attrs.length < 3 || attrs[0][0] !== 'r' || attrs[1][0] !== 's' || attrs[2][0] !== 'i') {
      this.fail('protocol', 'expected r=, s= and i= attributes in server-first-message');
    }
    const nonce = attrs[0][1];
    if (!NONCE_RE.test(nonce) || !nonce.startsWith(this.clientNonce) || nonce.length === this.clientNonce.length) {
      this.fail('protocol', 'server nonce does not extend client nonce');
    }
    const salt = decodeB64(attrs[1][1]);
    if (!salt || salt.length === 0) this.fail('protocol', 'invalid salt');
    const iterations = parseIterations(attrs[2][1]);
    if (iterations === null) this.fail('protocol', `invalid iteration count "${attrs[2][1]}"`);

    if (this.password !== undefined) {
      const keys = deriveKeys(saltPassword(this.password, salt, iterations));
      this.clientKey = keys.clientKey;
      this.serverKey = keys.serverKey;
    }
    const clientKey = this.clientKey!;
    const withoutProof = `c=biws,r=${nonce}`; // base64("n,,")
    const authMessage = `${this.clientFirstBare},${msg},${withoutProof}`;
    const proof = xor(clientKey, hmac(sha256(clientKey), authMessage));
    this.expectedServerSignature = hmac(this.serverKey!, authMessage);
    this.state = 'final';
    return `${withoutProof},p=${proof.toString('base64')}`;
  }

  /** Checks the server-final-message; throws ScramError unless the server proved it knows ServerKey. */
  verifyServerFinal(msg: string): void {
    if (this.state !== 'final') this.fail('protocol', 'unexpected server-final-message');
    this.state = 'done';
    if (msg.startsWith('e=')) this.fail('auth', `server rejected authentication: ${msg.slice(2)}`);
    const attrs = parseAttrs(msg);
    if (!attrs || attrs[0][0] !== 'v') this.fail('protocol', 'expected v= in server-final-message');
    const signature = decodeB64(attrs[0][1]);
    if (!signature || !safeEqual(signature, this.expectedServerSignature!)) {
      this.fail('auth', 'server signature mismatch');
    }
  }
}
