/**
 * A client's run-time parameters (from its startup packet) and the SQL that gives a pooled server
 * connection exactly those parameters.
 */

/** Startup-packet keys that are not run-time parameters (they pick the role, database, mode). */
const STARTUP_PARAMS_NOT_FORWARDED = new Set(['user', 'database', 'replication', 'options']);

export function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

export function quoteLiteral(value: string): string {
  return `'${value.replace(/'/g, "''")}'`;
}

/** Run-time parameters from the startup packet, including `-c name=value` in `options`. */
export function startupParamsToSet(params: Map<string, string>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [k, v] of params) if (!STARTUP_PARAMS_NOT_FORWARDED.has(k)) out.set(k, v);
  const options = params.get('options');
  if (options) {
    const tokens = options.match(/(?:\\.|\S)+/g) ?? [];
    for (let i = 0; i < tokens.length; i++) {
      let t = tokens[i].replace(/\\(.)/g, '$1');
      if (t === '-c' && i + 1 < tokens.length) t = tokens[++i].replace(/\\(.)/g, '$1');
      else if (t.startsWith('-c')) t = t.slice(2);
      else if (t.startsWith('--')) t = t.slice(2);
      else continue;
      const eq = t.indexOf('=');
      if (eq > 0) out.set(t.slice(0, eq).replace(/-/g, '_'), t.slice(eq + 1));
    }
  }
  return out;
}

/** SQL turning the parameters applied on a server connection into `desired` ('' when equal). */
export function paramSyncSql(desired: Map<string, string>, applied: Map<string, string>): string {
  const parts: string[] = [];
  for (const [k, v] of desired) {
    // set_config parses the value like a startup parameter does (`SET x = 'a,b'` would turn a
    // list such as search_path=a,b into the single quoted name "a,b").
    if (applied.get(k) !== v) parts.push(`SELECT pg_catalog.set_config(${quoteLiteral(k)}, ${quoteLiteral(v)}, false)`);
  }
  for (const k of applied.keys()) {
    if (!desired.has(k)) parts.push(`RESET ${quoteIdent(k)}`);
  }
  return parts.join('; ');
}
