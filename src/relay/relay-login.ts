/**
 * Relay-mode login: trustgate opens the server connection under the client's own user name and
 * carries the server's authentication requests to the client and the client's answers back,
 * each through the security-session callback, until the server accepts or refuses. trustgate
 * holds no password, hash or key of the client at any point.
 */
import { Frontend } from '../protocol/constants.js';
import { SqlState } from '../protocol/sqlstate.js';
import type { AuthChannel } from '../auth/client-auth.js';
import type { Logger } from '../log/logger.js';
import { ServerConnection, type ServerEndpoint } from '../server/server-connection.js';
import { securityMessageOf, SecuritySessionRefusal, type ClientSide, type SecuritySessionCallback, type SecuritySessionInfo } from './security-session.js';

export interface RelayLoginOptions {
  endpoint: ServerEndpoint;
  /** Database name on the server. */
  dbname: string;
  user: string;
  client: AuthChannel;
  callback: SecuritySessionCallback;
  info: Omit<SecuritySessionInfo, 'step'>;
  log: Logger;
  timeoutMs: number;
  /**
   * Forward mode: the client's own startup packet goes to the server, every other login message
   * (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery, notices) goes to
   * `passOn`, and the socket is left detached for a splice.
   */
  forward?: { startupPacket: Buffer; passOn: (message: Buffer) => void };
}

/** Resolves with the logged-in server connection; rejects with the server's error, a refusal or a failure. */
export function relayLogin(o: RelayLoginOptions): Promise<ServerConnection> {
  let step = 0;
  const authenticate = async (request: Buffer): Promise<Buffer | null> => {
    const message = securityMessageOf(request);
    const info: SecuritySessionInfo = { ...o.info, step: ++step };
    const client: ClientSide = {
      exchange: async (out = message.raw) => {
        o.client.send(out);
        if (!message.expectsAnswer) return null;
        const m = await o.client.receive();
        if (m.type !== Frontend.Password) {
          throw new SecuritySessionRefusal(`expected an authentication response, got message type "${String.fromCharCode(m.type)}"`, SqlState.ProtocolViolation);
        }
        return Buffer.from(m.buf.subarray(m.start, m.end));
      },
    };
    o.log.debug({ method: message.method, mechanisms: message.mechanisms, step: info.step }, 'relaying authentication request');
    return o.callback(message, client, info);
  };
  return ServerConnection.connect(o.endpoint, o.dbname, o.user, {}, new Map(), o.log, {
    authenticate,
    timeoutMs: o.timeoutMs,
    startupPacket: o.forward?.startupPacket,
    passOn: o.forward?.passOn,
    detach: Boolean(o.forward),
  });
}
