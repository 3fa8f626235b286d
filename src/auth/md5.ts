/**
 * PostgreSQL MD5 password authentication (AuthenticationMD5Password).
 * Stored form: "md5" + md5hex(password + user); wire response: "md5" + md5hex(storedHex + salt).
 * Pure: no I/O, only node:crypto.
 */
import { createHash, timingSafeEqual } from 'node:crypto';

const md5hex = (data: string | Buffer): string => createHash('md5').update(data).digest('hex');

/** Same test PostgreSQL applies to rolpassword: "md5" + 32 lowercase hex digits. */
export function isMd5Hash(text: string): boolean {
  return /^md5[0-9a-f]{32}$/.test(text);
}

/** What PostgreSQL stores for an MD5 role (the user name acts as the salt). */
export function md5PasswordHash(user: string, password: string): string {
  return 'md5' + md5hex(Buffer.from(password + user, 'utf8'));
}

/**
 * The PasswordMessage a client sends for `salt` (4 random bytes from the server).
 * Only the stored hash is needed, not the password — which is why MD5 hashes are
 * password-equivalent.
 */
export function md5Response(storedHash: string, salt: Buffer): string {
  if (!isMd5Hash(storedHash)) throw new TypeError('storedHash is not a PostgreSQL md5 hash');
  return 'md5' + md5hex(Buffer.concat([Buffer.from(storedHash.slice(3), 'ascii'), salt]));
}

/** Check a client's response in constant time (for equal lengths; length is not secret). */
export function verifyMd5Response(storedHash: string, salt: Buffer, response: string): boolean {
  if (!isMd5Hash(storedHash)) return false;
  const expected = Buffer.from(md5Response(storedHash, salt), 'utf8');
  const actual = Buffer.from(response, 'utf8');
  return expected.length === actual.length && timingSafeEqual(expected, actual);
}
