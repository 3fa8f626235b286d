/**
 * Raw-socket helpers for the TLS passthrough tests: SSLRequest / GSSENCRequest by hand, a TLS
 * client over an already negotiated socket (or direct TLS), and a SCRAM login plus simple query
 * over any socket (plain or TLS) through RawConnection.
 */
import net from 'node:net';
import tls from 'node:tls';
import { RawConnection, errorFields, type BackendMessage } from './raw-client.js';
import { queryMessage, saslInitialResponse, saslResponse, sslRequest, startupMessage, terminateMessage } from '../../src/protocol/frontend.js';
import { ScramClientExchange, SCRAM_SHA_256 } from '../../src/auth/scram.js';

export { sslRequest };

/** GSSENCRequest: length 8, code 80877104. */
export function gssencRequest(): Buffer {
  const b = Buffer.alloc(8);
  b.writeInt32BE(8, 0);
  b.writeInt32BE(80877104, 4);
  return b;
}

/** A plain TCP connection to 127.0.0.1:port. */
export function tcpConnect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.setNoDelay(true);
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

/** Reads exactly `n` bytes (or fewer if the peer closes first) within `timeoutMs`. */
export function readBytes(s: net.Socket, n: number, timeoutMs = 5000): Promise<Buffer> {
  return new Promise((resolve) => {
    let acc = Buffer.alloc(0);
    const done = () => {
      clearTimeout(timer);
      s.off('data', onData);
      s.off('close', done);
      s.pause();
      if (acc.length > n) s.unshift(acc.subarray(n));
      resolve(acc.subarray(0, n));
    };
    const onData = (chunk: Buffer) => {
      acc = Buffer.concat([acc, chunk]);
      if (acc.length >= n) done();
    };
    const timer = setTimeout(done, timeoutMs);
    s.on('data', onData);
    s.once('close', done);
    s.resume();
  });
}

/**
 * Collects everything the peer sends until it closes the connection (or `timeoutMs` passes).
 * `closed` tells which.
 */
export function collectUntilClosed(s: net.Socket, timeoutMs = 5000): Promise<{ bytes: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    if (s.destroyed) {
      resolve({ bytes: Buffer.alloc(0), closed: true });
      return;
    }
    const timer = setTimeout(() => {
      s.off('close', onClose);
      resolve({ bytes: Buffer.concat(chunks), closed: false });
    }, timeoutMs);
    const onClose = () => {
      clearTimeout(timer);
      resolve({ bytes: Buffer.concat(chunks), closed: true });
    };
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => undefined);
    s.once('close', onClose);
    s.resume();
  });
}

/** Starts TLS as a client over `socket` (after 'S'), or directly on a new connection (direct TLS). */
export function tlsClient(options: tls.ConnectionOptions, timeoutMs = 5000): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const s = tls.connect(options);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('TLS handshake timed out'));
    }, timeoutMs);
    s.once('secureConnect', () => {
      clearTimeout(timer);
      s.off('error', onError);
      resolve(s);
    });
    const onError = (err: Error) => {
      clearTimeout(timer);
      s.destroy();
      reject(err);
    };
    s.once('error', onError);
  });
}

function authRequest(m: BackendMessage): { code: number; payload: Buffer } {
  if (m.type !== 'R') {
    const detail = m.type === 'E' ? `: ${JSON.stringify(errorFields(m))}` : '';
    throw new Error(`expected an Authentication message, got '${m.type}'${detail}`);
  }
  return { code: m.bytes.readInt32BE(5), payload: m.bytes.subarray(9) };
}

/**
 * StartupMessage + SCRAM-SHA-256 (without channel binding) over an existing socket, plain or TLS,
 * up to ReadyForQuery. Returns the RawConnection wrapping the socket.
 */
export async function scramLoginOver(socket: net.Socket, user: string, password: string, database = 'postgres', timeoutMs = 10_000): Promise<RawConnection> {
  const conn = new RawConnection(socket);
  conn.write(startupMessage([['user', user], ['database', database], ['application_name', 'passthrough-raw']]));
  const first = authRequest(await conn.next(timeoutMs));
  if (first.code !== 10) throw new Error(`expected AuthenticationSASL, got code ${first.code}`);
  const mechanisms = first.payload.toString('utf8').split('\0').filter(Boolean);
  if (!mechanisms.includes(SCRAM_SHA_256)) throw new Error(`SCRAM-SHA-256 not offered: ${mechanisms.join(', ')}`);
  const scram = new ScramClientExchange({ password });
  conn.write(saslInitialResponse(SCRAM_SHA_256, scram.clientFirst()));
  const cont = authRequest(await conn.next(timeoutMs));
  if (cont.code !== 11) throw new Error(`expected AuthenticationSASLContinue, got code ${cont.code}`);
  conn.write(saslResponse(scram.handleServerFirst(cont.payload.toString('utf8'))));
  const fin = authRequest(await conn.next(timeoutMs));
  if (fin.code !== 12) throw new Error(`expected AuthenticationSASLFinal, got code ${fin.code}`);
  scram.verifyServerFinal(fin.payload.toString('utf8'));
  const ok = authRequest(await conn.next(timeoutMs));
  if (ok.code !== 0) throw new Error(`expected AuthenticationOk, got code ${ok.code}`);
  const rest = await conn.until('Z', timeoutMs);
  const err = rest.find((m) => m.type === 'E');
  if (err) throw new Error(`login failed: ${JSON.stringify(errorFields(err))}`);
  return conn;
}

/** Runs one simple query; returns the text values of the first column of every row. */
export async function simpleQuery(conn: RawConnection, sql: string, timeoutMs = 10_000): Promise<(string | null)[][]> {
  conn.write(queryMessage(sql));
  const msgs = await conn.until('Z', timeoutMs);
  const err = msgs.find((m) => m.type === 'E');
  if (err) throw new Error(`query failed: ${JSON.stringify(errorFields(err))}`);
  return msgs.filter((m) => m.type === 'D').map((m) => decodeDataRow(m.bytes));
}

function decodeDataRow(b: Buffer): (string | null)[] {
  const n = b.readInt16BE(5);
  const out: (string | null)[] = [];
  let pos = 7;
  for (let i = 0; i < n; i++) {
    const len = b.readInt32BE(pos);
    pos += 4;
    if (len < 0) out.push(null);
    else {
      out.push(b.toString('utf8', pos, pos + len));
      pos += len;
    }
  }
  return out;
}

/** Sends Terminate and closes. */
export function terminate(conn: RawConnection): void {
  conn.write(terminateMessage());
  conn.socket.end();
}
