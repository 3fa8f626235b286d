/** Negotiates TLS on a fresh socket to PostgreSQL (SSLRequest, then a TLS handshake). */
import type { Socket } from 'node:net';
import { readFileSync } from 'node:fs';
import tls from 'node:tls';
import { sslRequest } from '../protocol/frontend.js';
import type { Config } from '../config/schema.js';

export type ServerTlsConfig = Config['server']['tls'];

export class ServerTlsError extends Error {}

/** Reads exactly one byte answer to SSLRequest; more bytes are an attack (CVE-2021-23222). */
function readSslAnswer(socket: Socket): Promise<number> {
  return new Promise((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      cleanup();
      if (chunk.length !== 1) {
        socket.destroy();
        reject(new ServerTlsError('server sent unexpected bytes after the SSLRequest answer'));
        return;
      }
      resolve(chunk[0]);
    };
    const onClose = () => {
      cleanup();
      reject(new ServerTlsError('server closed the connection during SSL negotiation'));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    const cleanup = () => {
      socket.off('data', onData);
      socket.off('close', onClose);
      socket.off('error', onError);
      socket.pause();
    };
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.once('error', onError);
  });
}

/**
 * Applies the configured sslmode. Returns the socket to speak the protocol on (the TLS socket,
 * or the plain one when TLS is off or refused and the mode allows that).
 */
export async function negotiateServerTls(socket: Socket, host: string, cfg: ServerTlsConfig): Promise<Socket> {
  if (cfg.mode === 'disable') return socket;
  socket.write(sslRequest());
  const answer = await readSslAnswer(socket);
  if (answer === 0x4e /* N */) {
    if (cfg.mode === 'prefer') return socket;
    throw new ServerTlsError(`server does not support SSL, but tls.mode is ${cfg.mode}`);
  }
  if (answer !== 0x53 /* S */) throw new ServerTlsError(`invalid answer 0x${answer.toString(16)} to SSLRequest`);
  const verify = cfg.mode === 'verify-ca' || cfg.mode === 'verify-full';
  const servername = cfg.server_name ?? host;
  const options: tls.ConnectionOptions = {
    socket,
    rejectUnauthorized: verify,
    ca: cfg.ca_file ? readFileSync(cfg.ca_file) : undefined,
    cert: cfg.cert_file ? readFileSync(cfg.cert_file) : undefined,
    key: cfg.key_file ? readFileSync(cfg.key_file) : undefined,
    // SNI must not be an IP address.
    servername: /^[\d.]+$|:/.test(servername) ? undefined : servername,
    // verify-ca checks the chain only, like libpq.
    checkServerIdentity: cfg.mode === 'verify-full' ? (_h, cert) => tls.checkServerIdentity(servername, cert) : () => undefined,
  };
  return new Promise((resolve, reject) => {
    const tlsSocket = tls.connect(options);
    const onError = (err: Error) => reject(new ServerTlsError(`TLS handshake with server failed: ${err.message}`));
    tlsSocket.once('error', onError);
    tlsSocket.once('secureConnect', () => {
      tlsSocket.off('error', onError);
      resolve(tlsSocket);
    });
  });
}
