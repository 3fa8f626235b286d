/**
 * Pure parser for Teradata's GRANT / REVOKE CONNECT THROUGH statements (no I/O).
 * Reference: research/trusted-sessions.md §1.1 and §1.2.
 *
 *   GRANT CONNECT THROUGH t TO PERMANENT u [, ...] { WITHOUT ROLE | WITH ROLE r [, ...] } [;]
 *   GRANT CONNECT THROUGH t TO app [, ...] WITH ROLE r [, ...] [;]
 *   GRANT CONNECT THROUGH t WITH { TRUST_ONLY | TRUST ONLY } [;]
 *   REVOKE CONNECT THROUGH t { TO | FROM } PERMANENT u [, ...] [WITH ROLE r [, ...]] [;]
 *   REVOKE CONNECT THROUGH t { TO | FROM } app [, ...] [WITH ROLE r [, ...]] [;]
 *   REVOKE CONNECT THROUGH t WITH { TRUST_ONLY | TRUST ONLY } [;]
 *
 * Choices, following Teradata where it is explicit:
 * - REVOKE accepts TO or FROM (Teradata's `{ TO | FROM }`). REVOKE … WITH ROLE removes only those
 *   roles (`roles` non-empty); without it the whole rule goes (`roles` empty).
 * - TRUST_ONLY stands alone: Teradata says it "cannot be combined with WITH ROLE/WITHOUT ROLE in the
 *   same request", so `WITH TRUST_ONLY TO …` is an error. Both `TRUST_ONLY` and `TRUST ONLY` are
 *   accepted (the diagram prints the latter; the accepted token is unconfirmed).
 * - Application users need at least one WITH ROLE role; WITHOUT ROLE is for PERMANENT users only.
 * - WITH PROFILE is refused: trustgate has no profiles.
 * - At most 25 proxy user names per statement (Teradata's limit); a name may not repeat in a list.
 * - Identifiers follow PostgreSQL: unquoted → ASCII lower-cased, "quoted" kept as is with "" as an
 *   escaped quote; at most 63 bytes (PostgreSQL would truncate; we refuse). The unquoted words TO,
 *   FROM, PERMANENT, WITH and WITHOUT are keywords here and must be quoted to be used as names.
 * - Keywords are case-insensitive; whitespace and SQL comments may appear between tokens; one
 *   trailing `;` is allowed and nothing may follow it.
 */

import { fitsIdentifier, foldIdentifier, MAX_IDENTIFIER_BYTES, skipTrivia, startsWithStatement } from './sql-text.js';

export class ConnectThroughError extends Error {
  readonly sqlState = '42601';
  constructor(
    message: string,
    /** The offending token as written ('' at end of input). */
    readonly token: string = '',
    /** 1-based character position of the offending token in the statement, if known. */
    readonly position?: number,
  ) {
    super(message);
    this.name = 'ConnectThroughError';
  }
}

export type ConnectThroughStatement =
  | {
      kind: 'grant-permanent';
      trustedUser: string;
      users: readonly string[];
      /** true for WITHOUT ROLE (then `roles` is empty). */
      withoutRole: boolean;
      roles: readonly string[];
    }
  | { kind: 'grant-application'; trustedUser: string; users: readonly string[]; roles: readonly string[] }
  | { kind: 'grant-trust-only'; trustedUser: string }
  /** `roles` empty: revoke the whole rule; otherwise remove only these roles from it. */
  | { kind: 'revoke-permanent'; trustedUser: string; users: readonly string[]; roles: readonly string[] }
  | { kind: 'revoke-application'; trustedUser: string; users: readonly string[]; roles: readonly string[] }
  | { kind: 'revoke-trust-only'; trustedUser: string };

export const MAX_PROXY_USERS_PER_STATEMENT = 25;
const KEYWORDS = new Set(['to', 'from', 'permanent', 'with', 'without']);


/** Cheap check: does this SQL text start (after comments) with GRANT/REVOKE CONNECT THROUGH? */
export function isConnectThroughStatement(sql: string): boolean {
  return startsWithStatement(sql, /^(grant|revoke)\s+connect\s+through\b/i);
}

type Token = { kind: 'word' | 'quoted' | 'punct' | 'other' | 'end'; raw: string; value: string; pos: number };

const WORD = /[A-Za-z_\u0080-\u{10FFFF}][A-Za-z0-9_$\u0080-\u{10FFFF}]*/uy;

function tokenize(sql: string): Token[] {
  const tokens: Token[] = [];
  for (let i = 0; ; ) {
    i = skipTrivia(sql, i);
    if (i < 0) throw new ConnectThroughError('unterminated /* comment', '/*');
    const pos = i + 1;
    if (i >= sql.length) {
      tokens.push({ kind: 'end', raw: '', value: '', pos });
      return tokens;
    }
    WORD.lastIndex = i;
    const word = WORD.exec(sql);
    if (word) {
      tokens.push({ kind: 'word', raw: word[0], value: foldIdentifier(word[0]), pos });
      i += word[0].length;
    } else if (sql[i] === '"') {
      const m = /"((?:[^"]|"")*)"/y;
      m.lastIndex = i;
      const q = m.exec(sql);
      if (!q) {
        const raw = sql.slice(i, i + 20);
        throw new ConnectThroughError(`unterminated quoted identifier at or near "${raw}"`, raw, pos);
      }
      if (q[1] === '') throw new ConnectThroughError('zero-length quoted identifier at or near """"', '""', pos);
      tokens.push({ kind: 'quoted', raw: q[0], value: q[1].replace(/""/g, '"'), pos });
      i += q[0].length;
    } else if (sql[i] === ',' || sql[i] === ';') {
      tokens.push({ kind: 'punct', raw: sql[i], value: sql[i], pos });
      i++;
    } else {
      // Anything else (numbers, operators, string literals…) fits nowhere in the grammar: one token
      // for the parser to report.
      const raw = /[0-9][A-Za-z0-9_$]*/y.exec(sql.slice(i))?.[0] ?? String.fromCodePoint(sql.codePointAt(i)!);
      tokens.push({ kind: 'other', raw, value: raw, pos });
      i += raw.length;
    }
  }
}

/** Parses one GRANT/REVOKE CONNECT THROUGH statement. Throws ConnectThroughError (42601). */
export function parseConnectThrough(sql: string): ConnectThroughStatement {
  const tokens = tokenize(sql);
  let at = 0;
  const peek = (): Token => tokens[at];
  const isWord = (w: string): boolean => peek().kind === 'word' && peek().value === w;
  function fail(expected: string): never {
    const t = peek();
    const near = t.kind === 'end' ? 'at end of input' : `at or near "${t.raw}"`;
    throw new ConnectThroughError(`syntax error ${near}: expected ${expected}`, t.raw, t.pos);
  }
  function keyword(w: string): void {
    if (!isWord(w)) fail(w.toUpperCase());
    at++;
  }
  function identifier(what: string): string {
    const t = peek();
    if (t.kind === 'quoted' || (t.kind === 'word' && !KEYWORDS.has(t.value))) {
      if (!fitsIdentifier(t.value)) {
        throw new ConnectThroughError(`${what} "${t.raw}" is longer than ${MAX_IDENTIFIER_BYTES} bytes`, t.raw, t.pos);
      }
      at++;
      return t.value;
    }
    return fail(what);
  }
  function list(what: string, max = Infinity): string[] {
    const names: string[] = [];
    for (;;) {
      const t = peek();
      const name = identifier(what);
      if (names.includes(name)) throw new ConnectThroughError(`${what} "${t.raw}" is listed twice`, t.raw, t.pos);
      if (names.length === max) {
        throw new ConnectThroughError(`too many names at "${t.raw}": at most ${max} proxy user names are allowed per statement`, t.raw, t.pos);
      }
      names.push(name);
      if (peek().kind !== 'punct' || peek().value !== ',') return names;
      at++;
    }
  }
  /** After WITH: TRUST_ONLY or TRUST ONLY. Returns false (consuming nothing) if neither. */
  function trustOnly(): boolean {
    if (isWord('trust_only')) return (at++, true);
    if (!isWord('trust')) return false;
    at++;
    keyword('only');
    return true;
  }
  function roles(): string[] {
    if (isWord('profile')) fail('ROLE (WITH PROFILE is not supported: trustgate has no profiles)');
    keyword('role');
    return list('role name');
  }
  function end(result: ConnectThroughStatement): ConnectThroughStatement {
    if (peek().kind === 'punct' && peek().value === ';') at++;
    if (peek().kind !== 'end') fail('end of statement');
    return result;
  }

  const grant = isWord('grant');
  if (!grant && !isWord('revoke')) fail('GRANT or REVOKE');
  at++;
  keyword('connect');
  keyword('through');
  const trustedUser = identifier('trusted user name');

  if (isWord('with')) {
    at++;
    if (!trustOnly()) fail('TRUST_ONLY');
    if (isWord('to') || isWord('from')) {
      fail('end of statement (WITH TRUST_ONLY cannot be combined with TO/FROM; use a separate statement)');
    }
    return end({ kind: grant ? 'grant-trust-only' : 'revoke-trust-only', trustedUser });
  }

  if (grant) keyword('to');
  else if (isWord('to') || isWord('from')) at++;
  else fail('TO, FROM or WITH TRUST_ONLY');

  const permanent = isWord('permanent');
  if (permanent) at++;
  const users = list(permanent ? 'permanent user name' : 'application user name', MAX_PROXY_USERS_PER_STATEMENT);

  if (!grant) {
    const revoked = isWord('with') ? (at++, roles()) : [];
    return end({ kind: permanent ? 'revoke-permanent' : 'revoke-application', trustedUser, users, roles: revoked });
  }
  if (permanent && isWord('without')) {
    at++;
    keyword('role');
    return end({ kind: 'grant-permanent', trustedUser, users, withoutRole: true, roles: [] });
  }
  if (!isWord('with')) {
    fail(permanent ? 'WITH ROLE or WITHOUT ROLE' : 'WITH ROLE (application users need at least one role)');
  }
  at++;
  const granted = roles();
  return end(
    permanent
      ? { kind: 'grant-permanent', trustedUser, users, withoutRole: false, roles: granted }
      : { kind: 'grant-application', trustedUser, users, roles: granted },
  );
}
