/**
 * Lexical pieces shared by trustgate's own statements (SET QUERY_BAND, GRANT/REVOKE CONNECT
 * THROUGH), which PostgreSQL's parser does not know: comments, statement detection, identifiers.
 */

/** PostgreSQL's identifier limit (NAMEDATALEN - 1); longer names would be truncated, we refuse them. */
export const MAX_IDENTIFIER_BYTES = 63;

/**
 * Skips whitespace and SQL comments (`-- …`, nested `/* … *\/`) from `i`; returns the index of the
 * first other character, or -1 when a block comment is not terminated.
 */
export function skipTrivia(sql: string, i: number): number {
  for (;;) {
    while (i < sql.length && /\s/.test(sql[i])) i++;
    if (sql.startsWith('--', i)) {
      const nl = sql.indexOf('\n', i);
      i = nl < 0 ? sql.length : nl + 1;
    } else if (sql.startsWith('/*', i)) {
      let depth = 1;
      for (i += 2; depth > 0; ) {
        if (i >= sql.length) return -1;
        if (sql.startsWith('/*', i)) (depth++, (i += 2));
        else if (sql.startsWith('*/', i)) (depth--, (i += 2));
        else i++;
      }
    } else return i;
  }
}

/** Cheap check: does `sql`, after leading comments, start with `pattern` (anchored, e.g. /^set\s+x\b/i)? */
export function startsWithStatement(sql: string, pattern: RegExp): boolean {
  const start = skipTrivia(sql, 0);
  return start >= 0 && pattern.test(sql.slice(start));
}

/** Unquoted identifiers fold to lower case (ASCII only, as PostgreSQL does). */
export function foldIdentifier(word: string): string {
  return word.replace(/[A-Z]/g, (c) => c.toLowerCase());
}

export function fitsIdentifier(name: string): boolean {
  return Buffer.byteLength(name) <= MAX_IDENTIFIER_BYTES;
}

/** Length in Unicode code points (PostgreSQL counts characters, not UTF-16 units). */
export function codePointLength(text: string): number {
  let n = 0;
  for (const _ of text) n++;
  return n;
}
