/**
 * Authenticates a connecting client against its secret and returns what the gateway may use to
 * log in to the server as that user (SCRAM keys recovered from the proof, or the md5 hash).
 */
import { randomBytes } from 'node:crypto';
import { Frontend } from '../protocol/constants.js';
import { authenticationCleartext, authenticationMD5, authenticationSASL, authenticationSASLContinue, authenticationSASLFinal } from '../protocol/backend.js';
import { decodePassword, decodeSASLInitialResponse } from '../protocol/frontend.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';
import { ScramError, ScramServerExchange, SCRAM_SHA_256, scramKeysForPassword, type ScramSecret } from './scram.js';
import { md5PasswordHash, verifyMd5Response } from './md5.js';
import type { UserSecret } from './secrets.js';
import type { ServerCredentials } from '../server/server-connection.js';

export type ClientAuthMethod = 'scram-sha-256' | 'md5' | 'password' | 'trust' | 'cert';

/** The conversation with the client during authentication. */
export interface AuthChannel {
  send(message: Buffer): void;
  /** Next client message; `type` must be 'p' (password family) or the exchange fails. */
  receive(): Promise<{ type: number; buf: Buffer; start: number; end: number }>;
}

function failed(user: string): PgError {
  return new PgError(SqlState.InvalidPassword, `password authentication failed for user "${user}"`, 'FATAL');
}

async function receivePassword(ch: AuthChannel): Promise<{ buf: Buffer; start: number; end: number }> {
  const m = await ch.receive();
  if (m.type !== Frontend.Password) {
    throw new PgError(SqlState.ProtocolViolation, `expected password response, got message type "${String.fromCharCode(m.type)}"`, 'FATAL');
  }
  return m;
}

/** A secret that can never match, so unknown users take the same path as known ones. */
function decoySecret(): ScramSecret {
  return { iterations: 4096, salt: randomBytes(16), storedKey: randomBytes(32), serverKey: randomBytes(32) };
}

async function scramExchange(ch: AuthChannel, user: string, secret: ScramSecret | null): Promise<ServerCredentials> {
  ch.send(authenticationSASL([SCRAM_SHA_256]));
  const exchange = new ScramServerExchange(secret ?? decoySecret());
  try {
    const first = await receivePassword(ch);
    const init = decodeSASLInitialResponse(first.buf, first.start, first.end);
    if (init.mechanism !== SCRAM_SHA_256) {
      throw new PgError(SqlState.ProtocolViolation, `client selected an invalid SASL authentication mechanism "${init.mechanism}"`, 'FATAL');
    }
    if (!init.data) throw new PgError(SqlState.ProtocolViolation, 'malformed SCRAM message: empty initial response', 'FATAL');
    ch.send(authenticationSASLContinue(exchange.handleClientFirst(init.data).serverFirst));
    const final = await receivePassword(ch);
    const { serverFinal, clientKey } = exchange.handleClientFinal(final.buf.subarray(final.start + 5, final.end));
    if (!secret) throw failed(user);
    ch.send(authenticationSASLFinal(serverFinal));
    return { scramKeys: { clientKey, serverKey: secret.serverKey } };
  } catch (err) {
    if (err instanceof ScramError) {
      throw err.kind === 'auth' ? failed(user) : new PgError(SqlState.ProtocolViolation, err.message, 'FATAL', undefined);
    }
    throw err;
  }
}

async function md5Exchange(ch: AuthChannel, user: string, hash: string | null): Promise<ServerCredentials> {
  const salt = randomBytes(4);
  ch.send(authenticationMD5(salt));
  const m = await receivePassword(ch);
  const response = decodePassword(m.buf, m.start, m.end);
  if (!hash || !verifyMd5Response(hash, salt, response)) throw failed(user);
  return { md5Hash: hash };
}

async function cleartextExchange(ch: AuthChannel, user: string, secret: UserSecret | null): Promise<ServerCredentials> {
  ch.send(authenticationCleartext());
  const m = await receivePassword(ch);
  const password = decodePassword(m.buf, m.start, m.end);
  if (secret?.kind === 'scram') {
    const keys = scramKeysForPassword(password, secret.scram);
    if (keys) return { scramKeys: keys };
  } else if (secret?.kind === 'md5') {
    if (md5PasswordHash(user, password) === secret.hash) return { md5Hash: secret.hash };
  }
  throw failed(user);
}

/** Runs `method` for `user`; PostgreSQL's rules for md5 vs SCRAM secrets apply. */
export async function authenticateClient(ch: AuthChannel, method: ClientAuthMethod, user: string, secret: UserSecret | null): Promise<ServerCredentials> {
  switch (method) {
    case 'trust':
    case 'cert': // the certificate was checked during login (see ClientSession)
      return {};
    case 'password':
      return cleartextExchange(ch, user, secret);
    case 'md5':
      // As in PostgreSQL: with a SCRAM secret, "md5" authentication is done with SCRAM.
      if (secret?.kind === 'scram') return scramExchange(ch, user, secret.scram);
      return md5Exchange(ch, user, secret?.kind === 'md5' ? secret.hash : null);
    case 'scram-sha-256':
      // An md5 secret cannot be used for SCRAM; the exchange runs on a decoy and fails.
      return scramExchange(ch, user, secret?.kind === 'scram' ? secret.scram : null);
  }
}
