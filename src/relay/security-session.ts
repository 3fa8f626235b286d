/**
 * The security-session callback (Open Server's CS_SECSESSION_CB analogue): in relay mode every
 * authentication request the server sends passes through it on its way to the client, and its
 * result is what the server gets back. The default forwards both ways unchanged; an embedder may
 * observe, transform, answer itself, or refuse. Documented in docs/library.md.
 */
import { AuthCode, Frontend } from '../protocol/constants.js';

/** One authentication request from the server ('R' message other than AuthenticationOk). */
export interface SecurityMessage {
  /** The whole message as the client will get it: type byte, length, code, data. */
  readonly raw: Buffer;
  readonly code: number;
  readonly method: 'cleartext' | 'md5' | 'gss' | 'gss-continue' | 'sspi' | 'sasl' | 'sasl-continue' | 'sasl-final' | 'other';
  /** SASL mechanisms offered (AuthenticationSASL), without the -PLUS ones trustgate cannot relay. */
  readonly mechanisms: readonly string[];
  /** False for a message the client does not answer (SASLFinal). */
  readonly expectsAnswer: boolean;
}

export interface SecuritySessionInfo {
  readonly user: string;
  readonly database: string;
  /** Client address (host:port). */
  readonly remote: string;
  readonly clientTls: boolean;
  /** 1 for the server's first authentication request, then 2, 3, … */
  readonly step: number;
}

/** The client's side of the exchange, as the callback may use it. */
export interface ClientSide {
  /**
   * Sends `message` (default: the server's message as given to the callback) to the client and
   * resolves with the client's answer (a whole frontend message, type 'p'), or null when the
   * message expects none.
   */
  exchange(message?: Buffer): Promise<Buffer | null>;
}

/**
 * Resolves with the message to send to the server (normally the client's answer), or null to
 * send nothing. Throw SecuritySessionRefusal to end the login with an error to the client.
 */
export type SecuritySessionCallback = (message: SecurityMessage, client: ClientSide, info: SecuritySessionInfo) => Promise<Buffer | null>;

/** The default: the server's message goes to the client, the client's answer to the server. */
export const forwardSecurityMessage: SecuritySessionCallback = (_message, client) => client.exchange();

/** Thrown by a callback to refuse the login; the client gets FATAL with this text and SQLSTATE. */
export class SecuritySessionRefusal extends Error {
  constructor(
    message: string,
    readonly sqlState = '28000',
  ) {
    super(message);
    this.name = 'SecuritySessionRefusal';
  }
}

const METHODS: Record<number, SecurityMessage['method']> = {
  [AuthCode.CleartextPassword]: 'cleartext',
  [AuthCode.MD5Password]: 'md5',
  [AuthCode.GSS]: 'gss',
  [AuthCode.GSSContinue]: 'gss-continue',
  [AuthCode.SSPI]: 'sspi',
  [AuthCode.SASL]: 'sasl',
  [AuthCode.SASLContinue]: 'sasl-continue',
  [AuthCode.SASLFinal]: 'sasl-final',
};

/** Channel binding cannot survive a hop where trustgate terminates TLS: such mechanisms are never offered. */
const UNRELAYABLE = /-PLUS$/i;

/**
 * Decodes an authentication request for the callback. For AuthenticationSASL the -PLUS
 * mechanisms are removed (and `raw` rebuilt), so a client cannot choose channel binding that
 * would bind to trustgate's certificate instead of the server's.
 */
export function securityMessageOf(raw: Buffer): SecurityMessage {
  const code = raw.readInt32BE(5);
  const method = METHODS[code] ?? 'other';
  let mechanisms: string[] = [];
  let message = raw;
  if (code === AuthCode.SASL) {
    const offered = raw.toString('utf8', 9, raw.length).split('\0').filter(Boolean);
    mechanisms = offered.filter((m) => !UNRELAYABLE.test(m));
    if (mechanisms.length !== offered.length) message = authenticationSaslMessage(mechanisms);
  }
  return { raw: message, code, method, mechanisms, expectsAnswer: code !== AuthCode.SASLFinal };
}

/** AuthenticationSASL with these mechanisms (for callbacks that narrow the offer). */
export function authenticationSaslMessage(mechanisms: readonly string[]): Buffer {
  const body = Buffer.from(mechanisms.map((m) => `${m}\0`).join('') + '\0', 'utf8');
  const out = Buffer.alloc(9 + body.length);
  out[0] = 0x52;
  out.writeInt32BE(8 + body.length, 1);
  out.writeInt32BE(AuthCode.SASL, 5);
  body.copy(out, 9);
  return out;
}

/** The mechanism a SASLInitialResponse names, or null for any other answer. */
export function saslMechanismOf(answer: Buffer): string | null {
  if (answer.length < 6 || answer[0] !== Frontend.Password) return null;
  const end = answer.indexOf(0, 5);
  if (end < 0) return null;
  // A SASLInitialResponse goes on with the Int32 length of its data (-1 for none); a
  // PasswordMessage (cleartext, md5) ends at that NUL, and its text must never pass as a name.
  if (answer.length < end + 5) return null;
  const dataLength = answer.readInt32BE(end + 1);
  if (dataLength !== -1 && dataLength !== answer.length - end - 5) return null;
  const name = answer.toString('utf8', 5, end);
  return /^[A-Z0-9-_]{1,20}$/.test(name) ? name : null;
}
