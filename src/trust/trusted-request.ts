/**
 * Trusted requests: how a middle tier marks the requests that may set or change the proxy.
 *
 * The marking is a comment at the very start of the request text,
 *   /*trustgate:trusted=<key>*\/ SET QUERY_BAND = 'ProxyUser=alice;' FOR SESSION;
 * where <key> is the trusted user's trust key (`SELECT trustgate.trust_key('app_tier')`, an HMAC of
 * the trusted user's name with the database's identity key, 64 hex digits). The gateway checks and
 * strips it; it never reaches PostgreSQL or a log. Any driver can send it (it is SQL text), and SQL
 * assembled from end-user input cannot forge it: the end user does not know the key, and the
 * marking only counts at offset 0 of the request, which an application never fills from input.
 * A marking with a wrong key is refused (42501), never ignored, so guessing is visible.
 */
import { timingSafeEqual } from 'node:crypto';

const PREFIX = '/*trustgate:trusted=';

export interface TrustedMarking {
  /** The key as sent. */
  key: string;
  /** The request text after the marking. */
  rest: string;
}

/** The marking at the start of `sql` (leading whitespace allowed), or null. */
export function splitTrustedMarking(sql: string): TrustedMarking | null {
  let i = 0;
  while (i < sql.length && (sql[i] === ' ' || sql[i] === '\n' || sql[i] === '\t' || sql[i] === '\r')) i++;
  if (!sql.startsWith(PREFIX, i)) return null;
  const close = sql.indexOf('*/', i + PREFIX.length);
  if (close < 0) return null;
  return { key: sql.slice(i + PREFIX.length, close).trim(), rest: sql.slice(close + 2) };
}

/** Cheap check used on the hot path before decoding anything. */
export function mayHaveTrustedMarking(sql: string): boolean {
  return sql.includes(PREFIX);
}

export function trustKeyMatches(sent: string, expected: string | null): boolean {
  if (expected === null) return false;
  const a = Buffer.from(sent, 'utf8');
  const b = Buffer.from(expected, 'utf8');
  return a.length === b.length && timingSafeEqual(a, b);
}
