/**
 * Frontend (client → server) messages: decoders for the messages the gateway inspects, encoders
 * for what the gateway sends to servers itself, and the name rewrites used for prepared statements
 * in transaction pooling. Pure. Offsets are absolute positions in `buf`, `start` = type byte.
 */
import { CANCEL_REQUEST_CODE, Frontend, PROTOCOL_3_0, SSL_REQUEST_CODE } from './constants.js';
import { MessageWriter } from './writer.js';

export class MalformedMessageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MalformedMessageError';
  }
}

/** Reads a NUL-terminated string at `pos`; returns [value, positionAfterNul]. */
export function readCString(buf: Buffer, pos: number, end: number): [string, number] {
  const nul = buf.indexOf(0, pos);
  if (nul < 0 || nul >= end) throw new MalformedMessageError('unterminated string in message');
  return [buf.toString('utf8', pos, nul), nul + 1];
}

/** Query ('Q'): the SQL text. */
export function decodeQuery(buf: Buffer, start: number, end: number): string {
  const [sql, after] = readCString(buf, start + 5, end);
  if (after !== end) throw new MalformedMessageError('invalid Query message: trailing bytes');
  return sql;
}

export interface ParseMessage {
  name: string;
  query: string;
  /** Offset of the query's first byte (the raw bytes may not be valid UTF-8, e.g. LATIN1 clients). */
  queryStart: number;
  /** Offset of the Int16 parameter-type count. */
  typesStart: number;
}

export function decodeParse(buf: Buffer, start: number, end: number): ParseMessage {
  const [name, p1] = readCString(buf, start + 5, end);
  const [query, p2] = readCString(buf, p1, end);
  if (p2 + 2 > end) throw new MalformedMessageError('invalid Parse message: missing parameter count');
  const n = buf.readInt16BE(p2);
  if (n < 0 || p2 + 2 + n * 4 !== end) throw new MalformedMessageError('invalid Parse message: bad parameter types');
  return { name, query, queryStart: p1, typesStart: p2 };
}

export interface BindNames {
  portal: string;
  statement: string;
  /** Offset of the portal name's first byte; its raw bytes run to `statementStart` (incl. NUL). */
  portalStart: number;
  /** Offset of the statement name's first byte. */
  statementStart: number;
  /** Offset just after the statement name (start of the parameter format codes). */
  restStart: number;
}

export function decodeBindNames(buf: Buffer, start: number, end: number): BindNames {
  const [portal, p1] = readCString(buf, start + 5, end);
  const [statement, p2] = readCString(buf, p1, end);
  return { portal, statement, portalStart: start + 5, statementStart: p1, restStart: p2 };
}

/** Describe ('D') and Close ('C'): kind 'S' (statement) or 'P' (portal) and the name. */
export function decodeTarget(buf: Buffer, start: number, end: number): { kind: number; name: string } {
  if (end - start < 7) throw new MalformedMessageError('invalid Describe/Close message: too short');
  const kind = buf[start + 5];
  if (kind !== 0x53 && kind !== 0x50) throw new MalformedMessageError(`invalid Describe/Close target '${String.fromCharCode(kind)}'`);
  const [name, after] = readCString(buf, start + 6, end);
  if (after !== end) throw new MalformedMessageError('invalid Describe/Close message: trailing bytes');
  return { kind, name };
}

// ---- rewrites (transaction pooling renames client statement names to server names) ----

/** Parse with another statement name, same query and parameter types. */
export function rewriteParse(buf: Buffer, start: number, end: number, msg: ParseMessage, newName: string): Buffer {
  // Raw bytes from the query on: re-encoding the decoded string would alter non-UTF-8 bytes.
  const w = new MessageWriter(end - start + newName.length + 8).begin(Frontend.Parse).cstring(newName);
  w.bytes(buf.subarray(msg.queryStart, end));
  return w.end().toBuffer();
}

/** Bind with another statement name, same portal and the rest of the message unchanged. */
export function rewriteBind(buf: Buffer, end: number, names: BindNames, newStatement: string): Buffer {
  const w = new MessageWriter(end - names.portalStart + newStatement.length + 16).begin(Frontend.Bind);
  // The portal name (with its NUL) is copied as raw bytes, like the rest of the message.
  w.bytes(buf.subarray(names.portalStart, names.statementStart)).cstring(newStatement).bytes(buf.subarray(names.restStart, end));
  return w.end().toBuffer();
}

export function describeMessage(kind: number, name: string): Buffer {
  return new MessageWriter(16 + name.length).begin(Frontend.Describe).int8(kind).cstring(name).end().toBuffer();
}

export function closeMessage(kind: number, name: string): Buffer {
  return new MessageWriter(16 + name.length).begin(Frontend.Close).int8(kind).cstring(name).end().toBuffer();
}

// ---- encoders for the gateway's own server connections ----

export function startupMessage(params: Iterable<[string, string]>, protocol = PROTOCOL_3_0): Buffer {
  const w = new MessageWriter(256).begin(-1).int32(protocol);
  for (const [k, v] of params) w.cstring(k).cstring(v);
  return w.int8(0).end().toBuffer();
}

export function sslRequest(): Buffer {
  return new MessageWriter(8).begin(-1).int32(SSL_REQUEST_CODE).end().toBuffer();
}

export function cancelRequest(processId: number, secretKey: Buffer): Buffer {
  return new MessageWriter(16 + secretKey.length).begin(-1).int32(CANCEL_REQUEST_CODE).int32(processId).bytes(secretKey).end().toBuffer();
}

export function passwordMessage(password: string): Buffer {
  return new MessageWriter(16 + password.length).begin(Frontend.Password).cstring(password).end().toBuffer();
}

export function saslInitialResponse(mechanism: string, data: string): Buffer {
  const bytes = Buffer.from(data);
  return new MessageWriter(32 + bytes.length).begin(Frontend.Password).cstring(mechanism).int32(bytes.length).bytes(bytes).end().toBuffer();
}

export function saslResponse(data: string): Buffer {
  return new MessageWriter(16 + data.length).begin(Frontend.Password).bytes(Buffer.from(data)).end().toBuffer();
}

export function queryMessage(sql: string): Buffer {
  return new MessageWriter(16 + sql.length).begin(Frontend.Query).cstring(sql).end().toBuffer();
}

export function syncMessage(): Buffer {
  return Buffer.from([Frontend.Sync, 0, 0, 0, 4]);
}

export function terminateMessage(): Buffer {
  return Buffer.from([Frontend.Terminate, 0, 0, 0, 4]);
}

/** SASLInitialResponse from a client: mechanism and the initial data (null when length is -1). */
export function decodeSASLInitialResponse(buf: Buffer, start: number, end: number): { mechanism: string; data: Buffer | null } {
  const [mechanism, p] = readCString(buf, start + 5, end);
  if (p + 4 > end) throw new MalformedMessageError('invalid SASLInitialResponse: missing length');
  const n = buf.readInt32BE(p);
  if (n === -1) return { mechanism, data: null };
  if (n < 0 || p + 4 + n !== end) throw new MalformedMessageError('invalid SASLInitialResponse: bad data length');
  return { mechanism, data: buf.subarray(p + 4, end) };
}

/** Password message body as a string (cleartext or md5 response), without its NUL. */
export function decodePassword(buf: Buffer, start: number, end: number): string {
  const [pw, after] = readCString(buf, start + 5, end);
  if (after !== end) throw new MalformedMessageError('invalid password message: trailing bytes');
  return pw;
}

/** Parse/Bind/Execute/Sync of an unnamed statement with text parameters (gateway-internal queries). */
export function parseMessageForInternalQuery(sql: string, params: (string | null)[]): Buffer {
  const w = new MessageWriter(128 + sql.length);
  w.begin(Frontend.Parse).cstring('').cstring(sql).int16(0).end();
  writeBindExecute(w, '', params);
  w.begin(Frontend.Sync).end();
  return w.toBuffer();
}

/** Parse of a named statement (parameter types left to the server). */
export function parseMessage(name: string, sql: string): Buffer {
  return new MessageWriter(32 + name.length + sql.length).begin(Frontend.Parse).cstring(name).cstring(sql).int16(0).end().toBuffer();
}

/** Bind of the unnamed portal to a statement, text parameters, text results; then Execute it. */
export function bindExecuteMessages(statement: string, params: (string | null)[]): Buffer {
  const w = new MessageWriter(64 + statement.length + params.reduce((n, p) => n + (p?.length ?? 0) * 3 + 4, 0));
  writeBindExecute(w, statement, params);
  return w.toBuffer();
}

function writeBindExecute(w: MessageWriter, statement: string, params: (string | null)[]): void {
  w.begin(Frontend.Bind).cstring('').cstring(statement).int16(0).int16(params.length);
  for (const p of params) {
    if (p === null) w.int32(-1);
    else {
      const b = Buffer.from(p);
      w.int32(b.length).bytes(b);
    }
  }
  w.int16(0).end();
  w.begin(Frontend.Execute).cstring('').int32(0).end();
}
