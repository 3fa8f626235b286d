/** Turning what goes wrong with a client's bytes into the ErrorResponse it gets. */
import { decodeNoticeFields } from '../protocol/backend.js';
import { Frontend } from '../protocol/constants.js';
import { FramingError } from '../protocol/framer.js';
import { MalformedMessageError } from '../protocol/frontend.js';
import { StartupError } from '../protocol/startup.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';

export function toPgError(err: unknown): PgError {
  if (err instanceof PgError) return err;
  if (err instanceof FramingError) {
    return new PgError(err.code === 'too-long' ? SqlState.ProgramLimitExceeded : SqlState.ProtocolViolation, err.message, 'FATAL');
  }
  if (err instanceof StartupError) return new PgError(err.sqlState, err.message, 'FATAL');
  if (err instanceof MalformedMessageError) return new PgError(SqlState.ProtocolViolation, err.message, 'FATAL');
  return new PgError(SqlState.InternalError, `internal error: ${(err as Error)?.message ?? String(err)}`, 'FATAL');
}

const KNOWN_FRONTEND = new Set<number>([
  Frontend.Bind,
  Frontend.Close,
  Frontend.CopyData,
  Frontend.CopyDone,
  Frontend.CopyFail,
  Frontend.Describe,
  Frontend.Execute,
  Frontend.Flush,
  Frontend.FunctionCall,
  Frontend.Parse,
  Frontend.Password,
  Frontend.Query,
  Frontend.Sync,
  Frontend.Terminate,
]);

export function isKnownFrontendType(type: number): boolean {
  return KNOWN_FRONTEND.has(type);
}

export function unknownType(type: number): PgError {
  const shown = type >= 0x20 && type < 0x7f ? `"${String.fromCharCode(type)}"` : `0x${type.toString(16)}`;
  return new PgError(SqlState.ProtocolViolation, `invalid frontend message type ${shown}`, 'FATAL');
}


/** Is the ErrorResponse at the start of `chunk` (complete) of severity FATAL or PANIC? */
export function isFatal(chunk: Buffer): boolean {
  if (chunk.length < 5 || chunk.length < 1 + chunk.readInt32BE(1)) return false;
  const severity = decodeNoticeFields(chunk, 0, 1 + chunk.readInt32BE(1)).get('V');
  return severity === 'FATAL' || severity === 'PANIC';
}

