/**
 * One TLS (or GSSAPI-encrypted) passthrough connection: trustgate opens the server's encrypted
 * session on the client's behalf (SSLRequest → 'S', or direct TLS, or GSSENCRequest), replays
 * the client's ClientHello, then splices the two sockets. From there on it sees only ciphertext
 * and holds no key that could read it.
 */
import net, { type Socket } from 'node:net';
import { sslRequest } from '../protocol/frontend.js';
import { errorResponse } from '../protocol/backend.js';
import { PgError, SqlState } from '../protocol/sqlstate.js';
import { nextConnectionId, type Logger } from '../log/logger.js';
import { tlsAlert, TlsAlert, type PassthroughNegotiation, type PassthroughTarget } from '../client/prologue.js';
import { splice } from './splice.js';

export class PassthroughSession {
  readonly id = nextConnectionId('p');
  readonly connectedAt = Date.now();
  readonly remote: string;
  state: 'connecting' | 'spliced' | 'closed' = 'connecting';
  private server: Socket | null = null;
  private readonly log: Logger;

  constructor(
    private readonly client: Socket,
    readonly target: PassthroughTarget,
    readonly negotiation: PassthroughNegotiation,
    readonly serverName: string | null,
    private readonly initial: Buffer,
    parentLog: Logger,
    private readonly connectTimeoutMs: number,
    private readonly onClosed: (s: PassthroughSession) => void,
  ) {
    this.remote = `${client.remoteAddress}:${client.remotePort}`;
    this.log = parentLog.child({ conn: this.id });
  }

  /** Bytes moved each way (the sockets' own counters: nothing is counted per chunk). */
  get bytesFromClient(): number {
    return this.client.bytesRead;
  }
  get bytesToClient(): number {
    return this.client.bytesWritten;
  }

  async start(): Promise<void> {
    const t = this.target;
    this.client.on('error', () => undefined);
    // The client may go away (e.g. a reset) while the server session is being opened: stop
    // there, or the server connection would wait for a splice that can never notice it.
    const onClientGone = () => {
      if (this.state !== 'connecting') return;
      this.server?.destroy();
      this.closed();
    };
    this.client.once('close', onClientGone);
    let server: Socket;
    try {
      server = await connect(t, this.connectTimeoutMs);
    } catch (err) {
      if ((this.state as string) !== 'closed') this.refuse(`could not connect to server ${t.host}:${t.port}: ${(err as Error).message}`);
      return;
    }
    this.server = server;
    server.setNoDelay(true);
    if (this.state === 'closed') {
      server.destroy();
      return;
    }
    try {
      if (this.negotiation === 'ssl') {
        server.write(sslRequest());
        const answer = await readAnswerByte(server, this.connectTimeoutMs);
        if (answer !== 0x53 /* S */) {
          this.refuse(answer === 0x4e ? `server ${t.host}:${t.port} does not accept TLS (answered N to SSLRequest)` : `invalid answer 0x${answer.toString(16)} to SSLRequest`);
          return;
        }
        server.write(this.initial);
      } else if (this.negotiation === 'direct') {
        server.write(this.initial);
      } else {
        server.write(this.initial);
        // G or N goes to the client as the server said it; what follows is between the two.
        const answer = await readAnswerByte(server, this.connectTimeoutMs);
        this.client.write(Buffer.from([answer]));
      }
    } catch (err) {
      if ((this.state as string) !== 'closed') this.refuse((err as Error).message);
      return;
    }
    if ((this.state as string) === 'closed') return;
    this.client.off('close', onClientGone);
    this.state = 'spliced';
    this.log.info({ remote: this.remote, sni: this.serverName, server: `${t.host}:${t.port}`, negotiation: this.negotiation }, 'passthrough session started');
    splice(this.client, server, () => this.closed());
  }

  /** Closes both sides (shutdown). */
  close(): void {
    if (this.state === 'closed') return;
    this.client.destroy();
    this.server?.destroy();
    this.closed();
  }

  private closed(): void {
    if (this.state === 'closed') return;
    const wasSpliced = this.state === 'spliced';
    this.state = 'closed';
    if (wasSpliced) this.log.info({ bytesIn: this.bytesFromClient, bytesOut: this.bytesToClient }, 'passthrough session ended');
    this.onClosed(this);
  }

  /**
   * The server side failed before the splice. The client already started TLS (or waits for a
   * GSSENC answer): it gets a TLS alert, or a plain FATAL for GSSENC, and nothing is forwarded.
   */
  private refuse(reason: string): void {
    this.log.warn({ remote: this.remote, sni: this.serverName, server: `${this.target.host}:${this.target.port}`, reason }, 'passthrough refused');
    this.server?.destroy();
    if (this.client.writable) {
      this.client.end(this.negotiation === 'gssenc' ? errorResponse(new PgError(SqlState.SqlclientUnableToEstablish, `trustgate: ${reason}`, 'FATAL')) : tlsAlert(TlsAlert.InternalError));
    }
    setTimeout(() => this.client.destroy(), 1000).unref();
    this.closed();
  }
}

function connect(t: PassthroughTarget, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: t.host, port: t.port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('timeout'));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.off('error', onError);
      resolve(s);
    });
    const onError = (err: Error) => {
      clearTimeout(timer);
      reject(err);
    };
    s.once('error', onError);
  });
}

/** Exactly one byte; anything more before the handshake is refused (as libpq does, CVE-2021-23222). */
function readAnswerByte(s: Socket, timeoutMs: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error('timeout waiting for the server to answer the encryption request')), timeoutMs);
    const onData = (chunk: Buffer) => {
      cleanup();
      if (chunk.length !== 1) reject(new Error('server sent unexpected bytes after its answer to the encryption request'));
      else resolve(chunk[0]);
    };
    const onClose = () => fail(new Error('server closed the connection during encryption negotiation'));
    const fail = (err: Error) => {
      cleanup();
      reject(err);
    };
    const cleanup = () => {
      clearTimeout(timer);
      s.off('data', onData);
      s.off('close', onClose);
      s.off('error', fail);
      s.pause();
    };
    s.on('data', onData);
    s.once('close', onClose);
    s.once('error', fail);
  });
}
