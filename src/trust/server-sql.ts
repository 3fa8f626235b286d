/**
 * SQL the gateway sends in place of a client statement it handles itself.
 */
import type { PgError } from '../protocol/sqlstate.js';
import type { ConnectThroughStatement } from './connect-through.js';

/** A dollar-quoted literal whose tag does not occur in the text. */
export function dollarQuote(text: string, base = 'tg'): string {
  let tag = `$${base}$`;
  for (let i = 0; text.includes(tag); i++) tag = `$${base}${i}$`;
  return `${tag}${text}${tag}`;
}

/**
 * A statement that makes PostgreSQL raise `err` itself: a refusal then has exactly PostgreSQL's
 * effect on the transaction (an open transaction block is aborted, as any failed statement would
 * abort it) and arrives in order with the client's other replies.
 */
export function raiseSql(err: PgError): string {
  const fields = [`ERRCODE = '${err.code.replace(/[^0-9A-Z]/g, '')}'`, `MESSAGE = ${dollarQuote(err.message, 'm')}`];
  if (err.detail) fields.push(`DETAIL = ${dollarQuote(err.detail, 'd')}`);
  if (err.hint) fields.push(`HINT = ${dollarQuote(err.hint, 'h')}`);
  const body = `BEGIN RAISE EXCEPTION USING ${fields.join(', ')}; END`;
  return `DO ${dollarQuote(body, 'tgraise')}`;
}

/** GRANT/REVOKE CONNECT THROUGH runs as this call, as the granting user, in the database. */
export function connectThroughCallSql(stmt: ConnectThroughStatement): string {
  return `CALL trustgate.apply_connect_through(${dollarQuote(JSON.stringify(stmt), 'ct')}::jsonb)`;
}
