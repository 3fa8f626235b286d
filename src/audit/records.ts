/**
 * The shape of the audit logs: the query log (one row per request) and the access log (one row
 * per privilege decision), in TypeScript (camelCase) and as stored (snake_case columns, JSON
 * lines, spool lines). The column lists below are the single source of truth: the schema SQL
 * (audit-sql.ts), the writer's INSERT and the JSON lines are all generated from them.
 *
 * Also the statement-text policy (full | truncate | fingerprint | none, parameters only when
 * configured), applied when a record is formatted — off the request path, in the writer's batch.
 */
import { createHash } from 'node:crypto';
import { fingerprintSync } from 'libpg-query';

export type QueryResult = 'ok' | 'error' | 'refused' | 'canceled';
export type AccessDecision = 'granted' | 'refused';
/** Access-log events; other strings are allowed for events added later. */
export type AccessEvent =
  | 'proxy_granted'
  | 'proxy_refused'
  | 'connect_through_grant'
  | 'connect_through_revoke'
  | 'tamper_refused'
  | 'untrusted_refused'
  | 'server_refused'
  | (string & {});

/** One row of `trustgate.query_log`. */
export interface QueryLogRecord {
  logId: number;
  instance: string;
  clientAddr: string | null;
  clientSession: string | null;
  database: string | null;
  trustedUser: string | null;
  proxyUser: string | null;
  proxyRole: string | null;
  proxyKind: string | null;
  queryBand: string | null;
  transactionBand: string | null;
  sessionBand: string | null;
  statementText: string | null;
  statementFingerprint: string | null;
  statementKind: string | null;
  startedAt: string;
  endedAt: string;
  durationMs: number | null;
  rows: number | null;
  sqlstate: string | null;
  result: QueryResult;
  bytesIn: number | null;
  bytesOut: number | null;
  poolMode: string | null;
  trustedRequest: boolean;
  params: unknown;
}

/** One row of `trustgate.access_log`. */
export interface AccessLogRecord {
  logId: number;
  instance: string;
  at: string;
  clientAddr: string | null;
  clientSession: string | null;
  database: string | null;
  trustedUser: string | null;
  proxyUser: string | null;
  proxyRole: string | null;
  queryBand: string | null;
  event: AccessEvent;
  decision: AccessDecision;
  rule: unknown;
  sqlstate: string | null;
  message: string | null;
  detail: string | null;
  statementText: string | null;
  statementFingerprint: string | null;
}

/**
 * What a session hands to `gateway.audit.query()`. Times are epoch milliseconds (fractions keep
 * microseconds). `statementText` is the raw SQL: the policy decides what is stored. `params` are
 * the Bind values as text (null = SQL NULL); stored only with `log_parameters: true`.
 * The object is owned by the audit log once handed over: do not change it afterwards.
 */
export interface QueryLogInput {
  clientAddr?: string | null;
  clientSession?: string | null;
  database?: string | null;
  /** The login role of the client session (the trusted user of a trusted session); always set. */
  trustedUser?: string | null;
  proxyUser?: string | null;
  proxyRole?: string | null;
  proxyKind?: string | null;
  queryBand?: string | null;
  transactionBand?: string | null;
  sessionBand?: string | null;
  statementText?: string | null;
  /** e.g. the command tag ('SELECT', 'INSERT', …) or 'SET QUERY_BAND'. */
  statementKind?: string | null;
  startedAt: number;
  endedAt: number;
  /** Defaults to endedAt - startedAt. */
  durationMs?: number | null;
  rows?: number | null;
  /** SQLSTATE of the error, null on success. */
  sqlstate?: string | null;
  result: QueryResult;
  bytesIn?: number | null;
  bytesOut?: number | null;
  poolMode?: string | null;
  trustedRequest?: boolean;
  params?: readonly (string | null)[] | null;
}

/** What a session hands to `gateway.audit.access()` (same ownership rule as QueryLogInput). */
export interface AccessLogInput {
  /** Epoch milliseconds; defaults to the time of the call. */
  at?: number;
  clientAddr?: string | null;
  clientSession?: string | null;
  database?: string | null;
  trustedUser?: string | null;
  proxyUser?: string | null;
  proxyRole?: string | null;
  queryBand?: string | null;
  event: AccessEvent;
  decision: AccessDecision;
  /** The rule used (e.g. { kind, withoutRole, roles }), stored as jsonb. */
  rule?: unknown;
  sqlstate?: string | null;
  message?: string | null;
  detail?: string | null;
  statementText?: string | null;
}

export type LogKind = 'query' | 'access';

/** A column: TS field, SQL column, SQL type (with constraints). */
export type ColumnSpec = readonly [field: string, column: string, sqlType: string];

export const QUERY_LOG_COLUMNS: readonly ColumnSpec[] = [
  ['logId', 'log_id', 'bigint NOT NULL'],
  ['instance', 'instance', 'text NOT NULL'],
  ['clientAddr', 'client_addr', 'text'],
  ['clientSession', 'client_session', 'text'],
  ['database', 'database', 'text'],
  ['trustedUser', 'trusted_user', 'text'],
  ['proxyUser', 'proxy_user', 'text'],
  ['proxyRole', 'proxy_role', 'text'],
  ['proxyKind', 'proxy_kind', 'text'],
  ['queryBand', 'query_band', 'text'],
  ['transactionBand', 'transaction_band', 'text'],
  ['sessionBand', 'session_band', 'text'],
  ['statementText', 'statement_text', 'text'],
  ['statementFingerprint', 'statement_fingerprint', 'text'],
  ['statementKind', 'statement_kind', 'text'],
  ['startedAt', 'started_at', 'timestamptz NOT NULL'],
  ['endedAt', 'ended_at', 'timestamptz NOT NULL'],
  ['durationMs', 'duration_ms', 'double precision'],
  ['rows', 'rows', 'bigint'],
  ['sqlstate', 'sqlstate', 'text'],
  ['result', 'result', "text NOT NULL CHECK (result IN ('ok', 'error', 'refused', 'canceled'))"],
  ['bytesIn', 'bytes_in', 'bigint'],
  ['bytesOut', 'bytes_out', 'bigint'],
  ['poolMode', 'pool_mode', 'text'],
  ['trustedRequest', 'trusted_request', 'boolean NOT NULL DEFAULT false'],
  ['params', 'params', 'jsonb'],
];

export const ACCESS_LOG_COLUMNS: readonly ColumnSpec[] = [
  ['logId', 'log_id', 'bigint NOT NULL'],
  ['instance', 'instance', 'text NOT NULL'],
  ['at', 'at', 'timestamptz NOT NULL'],
  ['clientAddr', 'client_addr', 'text'],
  ['clientSession', 'client_session', 'text'],
  ['database', 'database', 'text'],
  ['trustedUser', 'trusted_user', 'text'],
  ['proxyUser', 'proxy_user', 'text'],
  ['proxyRole', 'proxy_role', 'text'],
  ['queryBand', 'query_band', 'text'],
  ['event', 'event', 'text NOT NULL'],
  ['decision', 'decision', "text NOT NULL CHECK (decision IN ('granted', 'refused'))"],
  ['rule', 'rule', 'jsonb'],
  ['sqlstate', 'sqlstate', 'text'],
  ['message', 'message', 'text'],
  ['detail', 'detail', 'text'],
  ['statementText', 'statement_text', 'text'],
  ['statementFingerprint', 'statement_fingerprint', 'text'],
];

// ------------------------------------------------------------------ statement-text policy

export type StatementTextMode = 'full' | 'truncate' | 'fingerprint' | 'none';

export interface StatementPolicy {
  mode: StatementTextMode;
  /** Characters kept with `truncate`. */
  truncateAt: number;
  logParameters: boolean;
}

export const DEFAULT_STATEMENT_POLICY: StatementPolicy = Object.freeze({ mode: 'full', truncateAt: 4096, logParameters: false });

const FINGERPRINT_CACHE_LIMIT = 10_000;
const fingerprints = new Map<string, string>();
/** libpg_query fingerprints by constant-free shape (see shapeKey). */
const shapes = new Map<string, string>();

/** Plain DML (where an integer after an operator, a comma or a parenthesis is a constant). */
const DML_START = /^\s*(?:select|insert|update|delete|with|values)\b/i;
/**
 * Texts the shape must leave alone: quoted identifiers (digits in them are names) and FLOAT(n)
 * (its precision picks float4 or float8 in the grammar).
 */
const SHAPE_UNSAFE = /["]|float\s*\(/i;
/** An integer constant: up to 9 digits after an operator, comma or parenthesis, not part of a word, number or $n. */
const INT_CONST = /([=<>(,+\-*/]\s*)\d{1,9}(?![\w$.])/g;

/**
 * The text with its integer constants replaced by 0, for plain DML only (else null). libpg_query's
 * fingerprint ignores constants in expressions, so texts of the same shape share it: with the
 * shape as a cache key, `WHERE aid = 1` … `WHERE aid = 99999` parse once, not once each.
 */
function shapeKey(text: string): string | null {
  if (!DML_START.test(text) || SHAPE_UNSAFE.test(text)) return null;
  return text.replace(INT_CONST, '$10');
}

/**
 * Fingerprint of a statement: libpg_query's (16 hex digits; constants, whitespace and comments do
 * not count, so `WHERE id = 1` and `WHERE id = 2` share it), or, when the text does not parse or
 * the parser is not loaded, 64 hex digits of sha256 over the whitespace-normalized text. Cached
 * per text and per shape (bounded), because the same statements repeat, often with other constants.
 */
export function statementFingerprint(text: string): string {
  const hit = fingerprints.get(text);
  if (hit !== undefined) return hit;
  const shape = shapeKey(text);
  let fp = shape === null ? undefined : shapes.get(shape);
  if (fp === undefined) {
    try {
      fp = fingerprintSync(text);
      // Only the parser's fingerprints are shared by shape (the sha256 fallback covers the digits).
      if (shape !== null) {
        if (shapes.size >= FINGERPRINT_CACHE_LIMIT) shapes.clear();
        shapes.set(shape, fp);
      }
    } catch {
      fp = createHash('sha256').update(text.trim().replace(/\s+/g, ' '), 'utf8').digest('hex');
    }
  }
  if (fingerprints.size >= FINGERPRINT_CACHE_LIMIT) fingerprints.clear();
  fingerprints.set(text, fp);
  return fp;
}

/** The first `n` UTF-16 units, without cutting a surrogate pair in half. */
export function truncateText(text: string, n: number): string {
  if (text.length <= n) return text;
  let end = Math.max(0, n);
  const last = text.charCodeAt(end - 1);
  if (end > 0 && last >= 0xd800 && last <= 0xdbff) end--;
  return text.slice(0, end);
}

/** What the policy stores for a statement text. */
export function applyStatementPolicy(
  text: string | null | undefined,
  policy: StatementPolicy,
): { statementText: string | null; statementFingerprint: string | null } {
  if (text === null || text === undefined || policy.mode === 'none') return { statementText: null, statementFingerprint: null };
  const statementFingerprintValue = statementFingerprint(text);
  switch (policy.mode) {
    case 'full':
      return { statementText: text, statementFingerprint: statementFingerprintValue };
    case 'truncate':
      return { statementText: truncateText(text, policy.truncateAt), statementFingerprint: statementFingerprintValue };
    default:
      return { statementText: null, statementFingerprint: statementFingerprintValue };
  }
}

// ------------------------------------------------------------------ formatting

const UNSAFE = /[\u0000\ud800-\udfff]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/**
 * PostgreSQL text cannot hold NUL, and its JSON parser refuses lone surrogates: either would make
 * a whole batch fail, so they are replaced here (U+FFFD) before anything is written.
 */
export function cleanText(s: string): string {
  if (!UNSAFE.test(s)) return s;
  return s.replace(/\u0000/g, '\ufffd').replace(LONE_SURROGATE, '\ufffd');
}

const str = (v: string | null | undefined): string | null => (v === null || v === undefined ? null : cleanText(v));
const num = (v: number | null | undefined): number | null => (v === null || v === undefined || !Number.isFinite(v) ? null : v);
const int = (v: number | null | undefined): number | null => (v === null || v === undefined || !Number.isFinite(v) ? null : Math.trunc(v));

const PAD3: string[] = Array.from({ length: 1000 }, (_, i) => String(i).padStart(3, '0'));
/** The last whole second formatted ("…T12:34:56."): records come in time order, so it repeats. */
let isoSecond = NaN;
let isoPrefix = '';

/** ISO 8601 in UTC with microseconds, from epoch milliseconds (fractions kept). */
export function isoMicros(ms: number): string {
  const whole = Math.floor(ms);
  const micros = Math.min(999, Math.max(0, Math.round((ms - whole) * 1000)));
  const sec = Math.floor(whole / 1000);
  if (sec !== isoSecond) {
    const iso = new Date(sec * 1000).toISOString(); // …T12:34:56.000Z (throws for invalid times, as before)
    isoPrefix = iso.slice(0, -4);
    isoSecond = sec;
  }
  return `${isoPrefix}${PAD3[whole - sec * 1000]}${PAD3[micros]}Z`;
}

/** Arbitrary JSON values (rule, params): strings inside cleaned the same way. */
function cleanJson(v: unknown): unknown {
  if (v === undefined || v === null) return null;
  if (typeof v === 'string') return cleanText(v);
  if (Array.isArray(v)) return v.map(cleanJson);
  if (typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v as Record<string, unknown>)) out[cleanText(k)] = cleanJson(x);
    return out;
  }
  return v;
}

/** The stored row (snake_case keys, as in SQL) of a query-log input. */
export function queryLogRow(logId: number, instance: string, r: QueryLogInput, policy: StatementPolicy): Record<string, unknown> {
  const s = applyStatementPolicy(r.statementText, policy);
  return {
    log_id: logId,
    instance,
    client_addr: str(r.clientAddr),
    client_session: str(r.clientSession),
    database: str(r.database),
    trusted_user: str(r.trustedUser),
    proxy_user: str(r.proxyUser),
    proxy_role: str(r.proxyRole),
    proxy_kind: str(r.proxyKind),
    query_band: str(r.queryBand),
    transaction_band: str(r.transactionBand),
    session_band: str(r.sessionBand),
    statement_text: str(s.statementText),
    statement_fingerprint: s.statementFingerprint,
    statement_kind: str(r.statementKind),
    started_at: isoMicros(r.startedAt),
    ended_at: isoMicros(r.endedAt),
    duration_ms: num(r.durationMs) ?? Math.max(0, r.endedAt - r.startedAt),
    rows: int(r.rows),
    sqlstate: str(r.sqlstate),
    result: r.result,
    bytes_in: int(r.bytesIn),
    bytes_out: int(r.bytesOut),
    pool_mode: str(r.poolMode),
    trusted_request: r.trustedRequest === true,
    params: policy.logParameters && r.params ? cleanJson(r.params) : null,
  };
}

/** The stored row (snake_case keys) of an access-log input. */
export function accessLogRow(logId: number, instance: string, r: AccessLogInput, policy: StatementPolicy, now = Date.now()): Record<string, unknown> {
  const s = applyStatementPolicy(r.statementText, policy);
  return {
    log_id: logId,
    instance,
    at: isoMicros(r.at ?? now),
    client_addr: str(r.clientAddr),
    client_session: str(r.clientSession),
    database: str(r.database),
    trusted_user: str(r.trustedUser),
    proxy_user: str(r.proxyUser),
    proxy_role: str(r.proxyRole),
    query_band: str(r.queryBand),
    event: cleanText(r.event),
    decision: r.decision,
    rule: cleanJson(r.rule),
    sqlstate: str(r.sqlstate),
    message: str(r.message),
    detail: str(r.detail),
    statement_text: str(s.statementText),
    statement_fingerprint: s.statementFingerprint,
  };
}

/** snake_case row → camelCase record (for readers of JSON lines or the spool in TypeScript). */
export function rowToRecord(log: 'query', row: Record<string, unknown>): QueryLogRecord;
export function rowToRecord(log: 'access', row: Record<string, unknown>): AccessLogRecord;
export function rowToRecord(log: LogKind, row: Record<string, unknown>): QueryLogRecord | AccessLogRecord {
  const out: Record<string, unknown> = {};
  for (const [field, column] of log === 'query' ? QUERY_LOG_COLUMNS : ACCESS_LOG_COLUMNS) out[field] = row[column] ?? null;
  return out as unknown as QueryLogRecord | AccessLogRecord;
}

// ------------------------------------------------------------------ entries

/**
 * A record on its way to the sinks. `line` (the JSON line: `{"log":…,` + the row) is made once,
 * by whichever sink needs it first, and shared by the database writer, the spool and JSON lines.
 */
export interface AuditEntry {
  readonly log: LogKind;
  readonly logId: number;
  readonly input: QueryLogInput | AccessLogInput;
  /** When the entry was made (access-log default time). */
  readonly madeAt: number;
  line?: string;
  /** The stored row, made once (the line and the database writer's arrays come from it). */
  row?: Record<string, unknown>;
  /** Synchronous audit: settled when the record is committed or fsync'd to the spool. */
  waiter?: { resolve: (logId: number) => void; reject: (err: Error) => void };
}

/** Formats entries (policy and instance in one place, so all sinks write the same line). */
export class EntryFormatter {
  constructor(
    public instance: string,
    public policy: StatementPolicy,
  ) {}

  line(e: AuditEntry): string {
    if (e.line !== undefined) return e.line;
    // `{"log":…,` + the row: the same as stringifying { log, ...row }, without copying the row.
    e.line = `{"log":"${e.log}",${JSON.stringify(this.row(e)).slice(1)}`;
    return e.line;
  }

  /** The stored row (snake_case keys, in column order) of an entry, for the database writer. */
  row(e: AuditEntry): Record<string, unknown> {
    e.row ??=
      e.log === 'query'
        ? queryLogRow(e.logId, this.instance, e.input as QueryLogInput, this.policy)
        : accessLogRow(e.logId, this.instance, e.input as AccessLogInput, this.policy, e.madeAt);
    return e.row;
  }
}
