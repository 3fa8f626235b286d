/**
 * Backend (server → client) messages: encoders for what the gateway says to clients itself, and
 * decoders for the few server messages the gateway must read. Pure.
 */
import { AuthCode, Backend, TxStatus } from './constants.js';
import { MessageWriter } from './writer.js';
import type { PgError, Severity } from './sqlstate.js';

export function authenticationOk(): Buffer {
  return new MessageWriter(9).begin(Backend.Authentication).int32(AuthCode.Ok).end().toBuffer();
}

export function authenticationCleartext(): Buffer {
  return new MessageWriter(9).begin(Backend.Authentication).int32(AuthCode.CleartextPassword).end().toBuffer();
}

export function authenticationMD5(salt: Buffer): Buffer {
  return new MessageWriter(13).begin(Backend.Authentication).int32(AuthCode.MD5Password).bytes(salt).end().toBuffer();
}

export function authenticationSASL(mechanisms: string[]): Buffer {
  const w = new MessageWriter(64).begin(Backend.Authentication).int32(AuthCode.SASL);
  for (const m of mechanisms) w.cstring(m);
  return w.int8(0).end().toBuffer();
}

export function authenticationSASLContinue(data: string | Buffer): Buffer {
  const bytes = typeof data === 'string' ? Buffer.from(data) : data;
  return new MessageWriter(16 + bytes.length).begin(Backend.Authentication).int32(AuthCode.SASLContinue).bytes(bytes).end().toBuffer();
}

export function authenticationSASLFinal(data: string | Buffer): Buffer {
  const bytes = typeof data === 'string' ? Buffer.from(data) : data;
  return new MessageWriter(16 + bytes.length).begin(Backend.Authentication).int32(AuthCode.SASLFinal).bytes(bytes).end().toBuffer();
}

export function parameterStatus(name: string, value: string): Buffer {
  return new MessageWriter(64).begin(Backend.ParameterStatus).cstring(name).cstring(value).end().toBuffer();
}

/** BackendKeyData; a 4-byte key for protocol 3.0, longer keys (up to 256 bytes) for 3.2. */
export function backendKeyData(processId: number, secretKey: Buffer): Buffer {
  return new MessageWriter(32).begin(Backend.BackendKeyData).int32(processId).bytes(secretKey).end().toBuffer();
}

export function readyForQuery(status: TxStatus = TxStatus.Idle): Buffer {
  return new MessageWriter(6).begin(Backend.ReadyForQuery).int8(status).end().toBuffer();
}

export function negotiateProtocolVersion(newestMinor: number, unsupportedOptions: string[]): Buffer {
  const w = new MessageWriter(64).begin(Backend.NegotiateProtocolVersion).int32((3 << 16) | newestMinor).int32(unsupportedOptions.length);
  for (const o of unsupportedOptions) w.cstring(o);
  return w.end().toBuffer();
}

export interface NoticeFields {
  severity: Severity;
  code: string;
  message: string;
  detail?: string;
  hint?: string;
}

function noticeLike(type: number, f: NoticeFields): Buffer {
  const w = new MessageWriter(128).begin(type);
  w.int8(0x53).cstring(f.severity); // 'S' localized severity
  w.int8(0x56).cstring(f.severity); // 'V' non-localized severity
  w.int8(0x43).cstring(f.code); // 'C'
  w.int8(0x4d).cstring(f.message); // 'M'
  if (f.detail) w.int8(0x44).cstring(f.detail); // 'D'
  if (f.hint) w.int8(0x48).cstring(f.hint); // 'H'
  return w.int8(0).end().toBuffer();
}

export function errorResponse(f: NoticeFields | PgError): Buffer {
  return noticeLike(Backend.ErrorResponse, {
    severity: f.severity,
    code: f.code,
    message: f.message,
    detail: f.detail,
    hint: f.hint,
  });
}

export function noticeResponse(f: NoticeFields): Buffer {
  return noticeLike(Backend.NoticeResponse, f);
}

export function parseComplete(): Buffer {
  return Buffer.from([Backend.ParseComplete, 0, 0, 0, 4]);
}

export function bindComplete(): Buffer {
  return Buffer.from([Backend.BindComplete, 0, 0, 0, 4]);
}

export function noData(): Buffer {
  return Buffer.from([Backend.NoData, 0, 0, 0, 4]);
}

export function closeComplete(): Buffer {
  return Buffer.from([Backend.CloseComplete, 0, 0, 0, 4]);
}

export function commandComplete(tag: string): Buffer {
  return new MessageWriter(32).begin(Backend.CommandComplete).cstring(tag).end().toBuffer();
}

export function emptyQueryResponse(): Buffer {
  return Buffer.from([Backend.EmptyQueryResponse, 0, 0, 0, 4]);
}

/** RowDescription for text columns of type `text` (OID 25), as used by the admin console. */
export function rowDescription(columns: string[]): Buffer {
  const w = new MessageWriter(64 + columns.length * 32).begin(Backend.RowDescription).int16(columns.length);
  for (const c of columns) w.cstring(c).int32(0).int16(0).int32(25).int16(-1).int32(-1).int16(0);
  return w.end().toBuffer();
}

export function dataRow(values: (string | null)[]): Buffer {
  const w = new MessageWriter(64).begin(Backend.DataRow).int16(values.length);
  for (const v of values) {
    if (v === null) w.int32(-1);
    else {
      const b = Buffer.from(v);
      w.int32(b.length).bytes(b);
    }
  }
  return w.end().toBuffer();
}

// ---- decoders (message bodies start after the 5-byte header) ----

/** Fields of an ErrorResponse/NoticeResponse, keyed by their one-letter codes. */
export function decodeNoticeFields(buf: Buffer, start: number, end: number): Map<string, string> {
  const fields = new Map<string, string>();
  let pos = start + 5;
  while (pos < end && buf[pos] !== 0) {
    const key = String.fromCharCode(buf[pos]);
    const valueEnd = buf.indexOf(0, pos + 1);
    if (valueEnd < 0 || valueEnd >= end) break;
    fields.set(key, buf.toString('utf8', pos + 1, valueEnd));
    pos = valueEnd + 1;
  }
  return fields;
}

export interface ServerError {
  severity: string;
  code: string;
  message: string;
  detail?: string;
}

export function decodeError(buf: Buffer, start: number, end: number): ServerError {
  const f = decodeNoticeFields(buf, start, end);
  return {
    severity: f.get('V') ?? f.get('S') ?? 'ERROR',
    code: f.get('C') ?? 'XX000',
    message: f.get('M') ?? 'unknown error',
    detail: f.get('D'),
  };
}

export function decodeParameterStatus(buf: Buffer, start: number, end: number): [string, string] {
  const nameEnd = buf.indexOf(0, start + 5);
  const valueEnd = buf.indexOf(0, nameEnd + 1);
  if (nameEnd < 0 || valueEnd < 0 || valueEnd >= end) return ['', ''];
  return [buf.toString('utf8', start + 5, nameEnd), buf.toString('utf8', nameEnd + 1, valueEnd)];
}

/** Command tag of a CommandComplete message. */
export function decodeCommandTag(buf: Buffer, start: number, end: number): string {
  return buf.toString('latin1', start + 5, end - 1);
}

/** An ErrorResponse/NoticeResponse of `type` with exactly these fields, in this order. */
export function encodeNoticeFields(type: number, fields: Map<string, string>): Buffer {
  const w = new MessageWriter(128).begin(type);
  for (const [key, value] of fields) w.int8(key.charCodeAt(0)).cstring(value);
  return w.int8(0).end().toBuffer();
}
