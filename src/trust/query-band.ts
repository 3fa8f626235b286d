/**
 * Pure parser for Teradata's SET QUERY_BAND statement and its name=value band (no I/O).
 *
 *   SET QUERY_BAND = '<band>' [UPDATE] FOR { SESSION [VOLATILE] | TRANSACTION } [;]
 *   SET QUERY_BAND = NONE FOR { SESSION | TRANSACTION } [;]
 *
 * Reference: research/trusted-sessions.md §1.4 (clause order as in Teradata's examples:
 * `… UPDATE FOR SESSION`, `… FOR SESSION VOLATILE`). Keywords are case-insensitive; whitespace and
 * SQL comments (`-- …`, nested `/* … *\/`) may appear between tokens; one trailing `;` is allowed
 * and nothing may follow it (the statement must stand alone, so a band can never smuggle in a second
 * statement). The literal is a standard SQL string: `''` is an apostrophe, backslash is literal.
 *
 * Band rules chosen (Teradata's, made stricter where the brief or safety asks; see §1.4 "Rules"):
 * - every pair is `name=value;`, the last one included; pads (whitespace) around names and values
 *   are stripped; whitespace after the last `;` is ignored; an empty pair (`;;`) is an error.
 * - names: 1..128 characters from [A-Za-z0-9_] (Teradata only forbids `=`, `;`, NUL; we keep names
 *   ASCII so they are unambiguous as log/setting keys and cannot be confusables of ProxyUser), unique
 *   case-insensitively.
 * - values: 1..256 characters (Teradata allows `name=;`; we do not), any character except `;`, `=`,
 *   and control characters (U+0000–U+001F, U+007F; Teradata forbids NUL). Spaces inside are kept.
 * - whole band: at most 4096 characters (the 17.x limit) as written in the literal, and the
 *   canonical text of a band built by UPDATE must also stay within it.
 * - lengths count Unicode code points ("UNICODE characters" in Teradata).
 * - the empty literal `''` (or only whitespace) means NONE ("An APOSTROPHE-enclosed null string is
 *   equivalent to NONE").
 * - reserved names ProxyUser and ProxyRole match case-insensitively and are output with that casing.
 *   ProxyUser's value is a PostgreSQL role name, ProxyRole's is a role name or ALL / NONE; role names
 *   follow PostgreSQL identifier rules (unquoted → ASCII lower-cased, "quoted" kept with "" escapes)
 *   and must fit in 63 bytes (PostgreSQL would silently truncate longer names; we refuse them).
 *   `pairs` keeps the value as written; `proxyUser` / `proxyRole` hold the normalised role name.
 */

import { codePointLength, fitsIdentifier, foldIdentifier, skipTrivia, startsWithStatement } from './sql-text.js';

export const QUERY_BAND_LIMITS = { name: 128, value: 256, band: 4096 } as const;

export type QueryBandSqlState = '22023' | '42601' | '0A000';

export class QueryBandError extends Error {
  constructor(
    readonly sqlState: QueryBandSqlState,
    message: string,
    /** Where in the band text the failing pair starts (0-based), when known. */
    public offset?: number,
  ) {
    super(message);
    this.name = 'QueryBandError';
  }
}

export type ProxyRole = { kind: 'all' } | { kind: 'none' } | { kind: 'role'; name: string };

export interface QueryBand {
  readonly pairs: ReadonlyArray<readonly [string, string]>;
  /** Case-insensitive lookup by name. */
  get(name: string): string | undefined;
  readonly proxyUser?: string;
  readonly proxyRole?: ProxyRole;
  /** Canonical text: `n=v;n=v;`. */
  toString(): string;
}

export interface SetQueryBand {
  scope: 'session' | 'transaction';
  volatile: boolean;
  update: boolean;
  /** null for NONE or the empty literal. */
  band: QueryBand | null;
}

const RESERVED = new Map([
  ['proxyuser', 'ProxyUser'],
  ['proxyrole', 'ProxyRole'],
]);

// ---------------------------------------------------------------------------------------------
// Statement level


/** Cheap check: does this SQL text start (after comments) with SET QUERY_BAND? Never throws. */
export function isQueryBandStatement(sql: string): boolean {
  return startsWithStatement(sql, /^set\s+query_band\b/i);
}

/**
 * Splits a request that starts with SET QUERY_BAND into that statement and the rest of the text
 * (Teradata: a FOR TRANSACTION band may be the first statement of a multi-statement request).
 * The statement ends at the first `;` outside string literals and comments; `rest` is '' when
 * only whitespace and comments follow. The statement is validated by parseSetQueryBand; the rest
 * goes to PostgreSQL on its own, so both are read exactly as they will be used.
 */
export function splitQueryBandRequest(sql: string): { statement: string; rest: string } {
  for (let i = 0; i < sql.length; ) {
    const next = skipTrivia(sql, i);
    if (next < 0) break;
    i = next;
    const c = sql[i];
    if (c === "'") {
      for (i++; i < sql.length; i++) {
        if (sql[i] === "'") {
          if (sql[i + 1] !== "'") break;
          i++;
        }
      }
      i++;
    } else if (c === ';') {
      const rest = sql.slice(i + 1);
      const after = skipTrivia(rest, 0);
      return { statement: sql.slice(0, i + 1), rest: after >= 0 && after >= rest.length ? '' : rest };
    } else i++;
  }
  return { statement: sql, rest: '' };
}

const WORD = /[A-Za-z_][A-Za-z0-9_]*/y;

type Token = { kind: 'word' | 'string' | 'punct' | 'other' | 'end'; text: string; start?: number };

function tokenize(sql: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  for (;;) {
    i = skipTrivia(sql, i);
    if (i < 0) throw new QueryBandError('42601', 'unterminated /* comment');
    if (i >= sql.length) break;
    const c = sql[i];
    WORD.lastIndex = i;
    const word = WORD.exec(sql);
    if (word) {
      tokens.push({ kind: 'word', text: word[0] });
      i += word[0].length;
    } else if (c === "'") {
      const start = i;
      let value = '';
      for (i++; ; i++) {
        if (i >= sql.length) throw new QueryBandError('42601', 'unterminated string literal in SET QUERY_BAND');
        if (sql[i] === "'") {
          if (sql[i + 1] !== "'") break;
          i++;
        }
        value += sql[i];
      }
      i++;
      tokens.push({ kind: 'string', text: value, start });
    } else if (c === '=' || c === ';') {
      tokens.push({ kind: 'punct', text: c });
      i++;
    } else {
      // Anything else (numbers, operators, ? markers…) fits nowhere in the grammar: one token for
      // the parser to report.
      const text = /[0-9][A-Za-z0-9_]*/y.exec(sql.slice(i))?.[0] ?? String.fromCodePoint(sql.codePointAt(i)!);
      tokens.push({ kind: 'other', text });
      i += text.length;
    }
  }
  tokens.push({ kind: 'end', text: '' });
  return tokens;
}

const statementCache = new Map<string, SetQueryBand>();
const STATEMENT_CACHE_LIMIT = 10_000;

/**
 * Parses a whole SET QUERY_BAND statement. Throws QueryBandError. Results are immutable and cached
 * per statement text (middle tiers repeat the same bands), so the hot path parses each text once.
 */
export function parseSetQueryBand(sql: string): SetQueryBand {
  const hit = statementCache.get(sql);
  if (hit) return hit;
  const parsed = Object.freeze(parseSetQueryBandUncached(sql));
  if (statementCache.size >= STATEMENT_CACHE_LIMIT) statementCache.clear();
  statementCache.set(sql, parsed);
  return parsed;
}

function parseSetQueryBandUncached(sql: string): SetQueryBand {
  const tokens = tokenize(sql);
  let pos = 0;
  const peek = (): Token => tokens[pos];
  const isWord = (w: string): boolean => peek().kind === 'word' && peek().text.toUpperCase() === w;
  function fail(expected: string): never {
    const t = peek();
    const near = t.kind === 'end' ? 'at end of input' : `at or near "${t.kind === 'string' ? `'${t.text}'` : t.text}"`;
    throw new QueryBandError('42601', `syntax error ${near} in SET QUERY_BAND: expected ${expected}`);
  }
  const expectWord = (w: string): void => {
    if (!isWord(w)) fail(w);
    pos++;
  };

  expectWord('SET');
  expectWord('QUERY_BAND');
  if (peek().text !== '=' || peek().kind !== 'punct') fail('"="');
  pos++;

  let bandText: string | null;
  const literalStart = peek().start ?? 0;
  if (peek().kind === 'string') bandText = peek().text;
  else if (isWord('NONE')) bandText = null;
  else fail("a quoted band ('name=value;...') or NONE");
  pos++;

  const update = isWord('UPDATE');
  if (update) pos++;
  expectWord('FOR');
  let scope: SetQueryBand['scope'];
  if (isWord('SESSION')) scope = 'session';
  else if (isWord('TRANSACTION')) scope = 'transaction';
  else fail('SESSION or TRANSACTION');
  pos++;
  const volatile = isWord('VOLATILE');
  if (volatile) pos++;
  if (peek().kind === 'punct' && peek().text === ';') pos++;
  if (peek().kind !== 'end') fail('end of statement');

  let band: QueryBand | null = null;
  if (bandText !== null && bandText.trim() !== '') {
    try {
      band = parseBand(bandText);
    } catch (err) {
      if (!(err instanceof QueryBandError) || err.offset === undefined) throw err;
      // Where the pair stands in the statement: each apostrophe in the band was written twice.
      const quotes = bandText.slice(0, err.offset).split("'").length - 1;
      const position = literalStart + 2 + err.offset + quotes;
      throw new QueryBandError(err.sqlState, `${err.message} (at character ${position} of the statement)`);
    }
  }
  const what = bandText === null ? 'NONE' : "an empty band ('')";
  if (band === null && update) throw new QueryBandError('0A000', `UPDATE cannot be used with ${what}`);
  if (volatile && scope === 'transaction') {
    throw new QueryBandError('0A000', 'VOLATILE can only be used with FOR SESSION, not FOR TRANSACTION');
  }
  if (volatile && band === null) throw new QueryBandError('0A000', `VOLATILE cannot be used with ${what}`);
  return { scope, volatile, update, band };
}

// ---------------------------------------------------------------------------------------------
// Band level

const bad = (message: string): never => {
  throw new QueryBandError('22023', message);
};

/** A PostgreSQL role name from a ProxyUser/ProxyRole value, or null if it is not one. */
function roleName(value: string): string | null {
  let name: string;
  const quoted = /^"((?:[^"]|"")+)"$/.exec(value);
  if (quoted) name = quoted[1].replace(/""/g, '"');
  else if (/^[A-Za-z_\u0080-\u{10FFFF}][A-Za-z0-9_$\u0080-\u{10FFFF}]*$/u.test(value)) {
    name = foldIdentifier(value);
  } else return null;
  return fitsIdentifier(name) ? name : null;
}

function proxyUserOf(value: string): string {
  return roleName(value) ?? bad(`ProxyUser value "${value}" is not a valid role name`);
}

function proxyRoleOf(value: string): ProxyRole {
  const upper = value.toUpperCase();
  if (upper === 'ALL') return { kind: 'all' };
  if (upper === 'NONE') return { kind: 'none' };
  const name = roleName(value);
  return name === null ? bad(`ProxyRole value "${value}" is not a valid role name, ALL or NONE`) : { kind: 'role', name };
}

/** Builds the band object from already validated pairs. */
function makeBand(pairs: Array<[string, string]>): QueryBand {
  const frozen = Object.freeze(pairs.map((p) => Object.freeze([p[0], p[1]] as const)));
  const get = (name: string): string | undefined => frozen.find((p) => p[0].toLowerCase() === name.toLowerCase())?.[1];
  const text = frozen.map(([n, v]) => `${n}=${v};`).join('');
  const band: { -readonly [K in keyof QueryBand]: QueryBand[K] } = { pairs: frozen, get, toString: () => text };
  const user = get('ProxyUser');
  const role = get('ProxyRole');
  if (user !== undefined) band.proxyUser = proxyUserOf(user);
  if (role !== undefined) band.proxyRole = proxyRoleOf(role);
  return Object.freeze(band);
}

function checkBandLength(length: number): void {
  if (length > QUERY_BAND_LIMITS.band) {
    bad(`query band is ${length} characters long; the limit is ${QUERY_BAND_LIMITS.band}`);
  }
}

/** Parses the text inside the quotes: `name=value;` pairs. Throws QueryBandError (22023). */
export function parseBand(text: string): QueryBand {
  checkBandLength(codePointLength(text));
  if (text.trim() === '') bad('query band is empty (use NONE to remove a band)');
  const pairs: Array<[string, string]> = [];
  const seen = new Set<string>();
  let rest = text;
  while (rest.trim() !== '') {
    const pairStart = text.length - rest.length + (rest.length - rest.trimStart().length);
    try {
      rest = parsePair(rest, pairs, seen);
    } catch (err) {
      if (err instanceof QueryBandError) err.offset ??= pairStart;
      throw err;
    }
  }
  return makeBand(pairs);
}

/** Reads one `name=value;` pair from the start of `rest` into `pairs`; returns what follows it. */
function parsePair(rest: string, pairs: Array<[string, string]>, seen: Set<string>): string {
  const semi = rest.indexOf(';');
  if (semi < 0) bad(`query band pair "${rest.trim()}" is not terminated by ';'`);
  const pair = rest.slice(0, semi);
  rest = rest.slice(semi + 1);
  if (pair.trim() === '') bad("query band has an empty pair (';' with no name=value before it)");
  const eq = pair.indexOf('=');
  if (eq < 0) bad(`query band pair "${pair.trim()}" has no '='`);
  let name = pair.slice(0, eq).trim();
  const value = pair.slice(eq + 1).trim();
  if (name === '') bad(`query band pair "${pair.trim()}" has an empty name`);
  if (!/^[A-Za-z0-9_]+$/.test(name)) bad(`query band name "${name}" may contain only letters, digits and '_'`);
  if (name.length > QUERY_BAND_LIMITS.name) {
    bad(`query band name "${name.slice(0, 20)}…" is ${name.length} characters long; the limit is ${QUERY_BAND_LIMITS.name}`);
  }
  if (value === '') bad(`query band name "${name}" has an empty value`);
  if (value.includes('=')) bad(`query band value for "${name}" contains '='`);
  if (/[\u0000-\u001f\u007f]/.test(value)) bad(`query band value for "${name}" contains a control character`);
  const valueLength = codePointLength(value);
  if (valueLength > QUERY_BAND_LIMITS.value) {
    bad(`query band value for "${name}" is ${valueLength} characters long; the limit is ${QUERY_BAND_LIMITS.value}`);
  }
  const key = name.toLowerCase();
  if (seen.has(key)) bad(`query band name "${name}" appears more than once`);
  seen.add(key);
  name = RESERVED.get(key) ?? name;
  if (name === 'ProxyUser') proxyUserOf(value);
  if (name === 'ProxyRole') proxyRoleOf(value);
  pairs.push([name, value]);
  return rest;
}

/**
 * SET QUERY_BAND = '…' UPDATE: pairs of `update` replace same-named pairs of `session` (case-
 * insensitively, keeping the position and the spelling of the existing name) and new names are
 * appended in order. The canonical result must stay within the 4096-character band limit.
 */
export function mergeBand(session: QueryBand | null, update: QueryBand): QueryBand {
  const pairs: Array<[string, string]> = (session?.pairs ?? []).map(([n, v]) => [n, v]);
  for (const [name, value] of update.pairs) {
    const existing = pairs.find((p) => p[0].toLowerCase() === name.toLowerCase());
    if (existing) existing[1] = value;
    else pairs.push([name, value]);
  }
  checkBandLength(codePointLength(pairs.map(([n, v]) => `${n}=${v};`).join('')));
  return makeBand(pairs);
}

/**
 * The band in force for a request. Teradata's precedence is "transaction, then session, then
 * profile, and the first match wins" (research §1.4 "Precedence"; §1.5 example: a session band
 * `PROXYUSER=cluser1;PROXYROLE=role1;` plus a transaction band `PROXYROLE=role2;` runs as cluser1
 * with role2). So the rule is pair-by-pair: every transaction pair is in force; a session pair is in
 * force only if the transaction band has no pair of the same name (case-insensitive). Result order:
 * transaction pairs first, then the remaining session pairs (as in `=T> … =S> …`). The result is a
 * view of two bands that each passed the limits, so the combined length is not limited again.
 * Returns null when neither band is set.
 */
export function effectiveBand(session: QueryBand | null, transaction: QueryBand | null): QueryBand | null {
  if (transaction === null) return session;
  if (session === null) return transaction;
  const pairs: Array<[string, string]> = transaction.pairs.map(([n, v]) => [n, v]);
  for (const [name, value] of session.pairs) {
    if (transaction.get(name) === undefined) pairs.push([name, value]);
  }
  return makeBand(pairs);
}
