/**
 * Classifies SQL text with the real PostgreSQL parser (libpg-query): does it leave state in the
 * server session that outlives the transaction (and so must not be seen by the next client)?
 *
 * Hot path: a keyword pre-check skips the parse for ordinary statements, and results are cached
 * per SQL text, so each distinct statement is parsed at most once.
 */
import { loadModule, parseSync } from 'libpg-query';

export interface SqlClass {
  /** The statement leaves session-level state behind (SET, temp table, LISTEN, …). */
  sessionState: boolean;
  /** What kind of state, for logs. */
  reason?: string;
}

const PLAIN: SqlClass = Object.freeze({ sessionState: false });
const CACHE_LIMIT = 10_000;
const cache = new Map<string, SqlClass>();

/**
 * Words that can introduce session state; text without any of them needs no parse. `u&`: a
 * Unicode-escaped identifier (U&"\0073et_config") can spell any of them.
 */
const SUSPECT = /set|prepare|declare|listen|temp|advisory|load|\bdo\b|dblink|lock|u&/i;

const ADVISORY_SESSION_LOCKS = new Set([
  'pg_advisory_lock',
  'pg_advisory_lock_shared',
  'pg_try_advisory_lock',
  'pg_try_advisory_lock_shared',
]);

let loaded: Promise<void> | null = null;

/** Loads the parser (WebAssembly) once; call before classifySql and findIdentityTamper. */
export function loadSqlParser(): Promise<void> {
  loaded ??= loadModule();
  return loaded;
}

export function classifySql(sql: string): SqlClass {
  if (!SUSPECT.test(sql)) return PLAIN;
  const hit = cache.get(sql);
  if (hit) return hit;
  const result = classifyUncached(sql);
  if (cache.size >= CACHE_LIMIT) cache.clear();
  cache.set(sql, result);
  return result;
}

function classifyUncached(sql: string): SqlClass {
  let tree: unknown;
  try {
    tree = parseSync(sql);
  } catch {
    // PostgreSQL will reject it too; nothing can have changed.
    return PLAIN;
  }
  const reason = findSessionState(tree);
  return reason ? { sessionState: true, reason } : PLAIN;
}

type Node = Record<string, unknown>;

/** The session's temporary schema, by its alias or its real name. */
const TEMP_SCHEMA = /^pg_temp(_\d+)?$/;

function funcName(call: Node): string {
  const parts = (call.funcname as Node[] | undefined) ?? [];
  const last = parts[parts.length - 1] as { String?: { sval?: string } } | undefined;
  return (last?.String?.sval ?? '').toLowerCase();
}

/** Depth-first walk; returns the first kind of session state found. */
function findSessionState(node: unknown): string | undefined {
  if (Array.isArray(node)) {
    // A qualified name (function, type, domain, …) in the session's temporary schema.
    const first = node.length > 1 ? (node[0] as { String?: { sval?: string } } | null)?.String?.sval : undefined;
    if (first !== undefined && TEMP_SCHEMA.test(first)) return 'temporary object';
    for (const n of node) {
      const r = findSessionState(n);
      if (r) return r;
    }
    return undefined;
  }
  if (!node || typeof node !== 'object') return undefined;
  for (const [key, value] of Object.entries(node as Node)) {
    const v = value as Node;
    switch (key) {
      case 'VariableSetStmt': {
        const name = String(v.name ?? '').toLowerCase();
        if (!v.is_local && name !== 'transaction') return `SET ${name || 'ALL'}`;
        break;
      }
      case 'PrepareStmt':
        return 'PREPARE';
      case 'ListenStmt':
        return 'LISTEN';
      case 'LoadStmt':
        return 'LOAD';
      case 'DoStmt':
        return 'DO block';
      case 'DeclareCursorStmt':
        if ((Number(v.options ?? 0) & 0x20) !== 0) return 'cursor WITH HOLD';
        break;
      case 'relpersistence':
        if (value === 't') return 'temporary object';
        break;
      case 'schemaname': // CREATE TABLE pg_temp.t … is temporary without the TEMP keyword
        if (typeof value === 'string' && TEMP_SCHEMA.test(value)) return 'temporary object';
        break;
      case 'FuncCall': {
        const name = funcName(v);
        if (ADVISORY_SESSION_LOCKS.has(name)) return 'session advisory lock';
        if (name === 'set_config') {
          const isLocal = ((v.args as Node[] | undefined) ?? [])[2] as { A_Const?: { boolval?: { boolval?: boolean } } } | undefined;
          if (isLocal?.A_Const?.boolval?.boolval !== true) return 'set_config';
        }
        if (name.startsWith('dblink_connect')) return 'dblink connection';
        break;
      }
    }
    if (value && typeof value === 'object') {
      const r = findSessionState(value);
      if (r) return r;
    }
  }
  return undefined;
}
