/**
 * A raw protocol client for tests that need to send bytes no driver would: a plain TCP socket,
 * a framer for what the gateway answers, and a SCRAM login done by hand with ScramClientExchange.
 */
import net from 'node:net';
import { MessageFramer } from '../../src/protocol/framer.js';
import { decodeNoticeFields } from '../../src/protocol/backend.js';
import { saslInitialResponse, saslResponse, startupMessage } from '../../src/protocol/frontend.js';
import { ScramClientExchange, SCRAM_SHA_256 } from '../../src/auth/scram.js';

export interface BackendMessage {
  /** Type as a character, e.g. 'E', 'Z'. */
  type: string;
  /** The whole message (type byte, length, body). */
  bytes: Buffer;
}

/** Decoded fields of an ErrorResponse/NoticeResponse: S, V, C, M, … */
export function errorFields(m: BackendMessage): Record<string, string> {
  return Object.fromEntries(decodeNoticeFields(m.bytes, 0, m.bytes.length));
}

export class RawConnection {
  readonly messages: BackendMessage[] = [];
  /** Bytes the gateway sent that did not frame (e.g. 'N' after an SSLRequest, or garbage). */
  framingError: Error | null = null;
  closed = false;
  /** Every byte received, as it came. */
  readonly received: Buffer[] = [];
  readonly closedPromise: Promise<void>;
  private readonly framer = new MessageFramer(1 << 30);
  private waiters: (() => void)[] = [];
  private consumed = 0;

  constructor(readonly socket: net.Socket) {
    socket.on('error', () => undefined);
    socket.on('data', (chunk: Buffer) => {
      this.received.push(chunk);
      if (this.framingError) return;
      try {
        this.framer.push(chunk, (type, buf, start, end) => {
          this.messages.push({ type: String.fromCharCode(type), bytes: Buffer.from(buf.subarray(start, end)) });
        });
      } catch (err) {
        this.framingError = err as Error;
      }
      this.wake();
    });
    this.closedPromise = new Promise((resolve) => {
      socket.once('close', () => {
        this.closed = true;
        this.wake();
        resolve();
      });
    });
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawConnection> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ port, host });
      socket.setNoDelay(true);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new RawConnection(socket));
      });
      socket.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private changed(timeoutMs: number): Promise<boolean> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.waiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  write(data: Buffer): void {
    if (!this.socket.destroyed && this.socket.writable) this.socket.write(data);
  }

  /** The next message not yet consumed; throws on timeout or when the socket closed first. */
  async next(timeoutMs = 5000): Promise<BackendMessage> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.consumed < this.messages.length) return this.messages[this.consumed++];
      if (this.closed) throw new Error(`connection closed while waiting for a message (got ${this.describe()})`);
      const left = deadline - Date.now();
      if (left <= 0 || !(await this.changed(left))) {
        if (this.consumed < this.messages.length) continue;
        throw new Error(`timeout waiting for a message (got ${this.describe()})`);
      }
    }
  }

  /** Consumes messages up to and including the first of `type`; returns all consumed. */
  async until(type: string, timeoutMs = 5000): Promise<BackendMessage[]> {
    const deadline = Date.now() + timeoutMs;
    const out: BackendMessage[] = [];
    for (;;) {
      const m = await this.next(Math.max(1, deadline - Date.now()));
      out.push(m);
      if (m.type === type) return out;
    }
  }

  /** Waits until the gateway closes the connection; returns whether it did within the time. */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    if (this.closed) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    const r = await Promise.race([this.closedPromise.then(() => true as const), timedOut]);
    clearTimeout(timer);
    return r;
  }

  /** Waits for close (or timeout) and returns every message not consumed yet. */
  async drain(timeoutMs = 5000): Promise<{ closed: boolean; messages: BackendMessage[] }> {
    const closed = await this.waitClosed(timeoutMs);
    const messages = this.messages.slice(this.consumed);
    this.consumed = this.messages.length;
    return { closed, messages };
  }

  describe(): string {
    return this.messages.map((m) => m.type).join('') || 'nothing';
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export interface LoginOptions {
  user: string;
  password: string;
  database?: string;
  /** Extra startup parameters (e.g. client_encoding, application_name). */
  params?: Record<string, string>;
  timeoutMs?: number;
  /** Bytes sent in the same write as the final SASL response (pipelined behind authentication). */
  pipelined?: Buffer;
  /** Requested protocol minor version (3.x), default 0. */
  protocolMinor?: number;
  /** Messages the gateway sent before authentication (e.g. NegotiateProtocolVersion) land here. */
  preAuth?: BackendMessage[];
  /** Messages after AuthenticationOk up to ReadyForQuery (ParameterStatus, BackendKeyData) land here. */
  afterAuth?: BackendMessage[];
}

/** Reads an Authentication message's sub-code and payload. */
function authRequest(m: BackendMessage): { code: number; payload: Buffer } {
  if (m.type !== 'R') {
    const detail = m.type === 'E' ? `: ${JSON.stringify(errorFields(m))}` : '';
    throw new Error(`expected an Authentication message, got '${m.type}'${detail}`);
  }
  return { code: m.bytes.readInt32BE(5), payload: m.bytes.subarray(9) };
}

/**
 * Connects, sends a StartupMessage, performs SCRAM-SHA-256 as a client, and waits for
 * ReadyForQuery. Returns the connection with the login messages consumed.
 */
export async function rawLogin(port: number, options: LoginOptions): Promise<RawConnection> {
  const timeout = options.timeoutMs ?? 10_000;
  const conn = await RawConnection.connect(port);
  try {
    const params: [string, string][] = [
      ['user', options.user],
      ['database', options.database ?? 'postgres'],
      ...Object.entries(options.params ?? {}),
    ];
    conn.write(startupMessage(params, (3 << 16) | (options.protocolMinor ?? 0)));
    let firstMessage = await conn.next(timeout);
    while (firstMessage.type === 'v') {
      options.preAuth?.push(firstMessage);
      firstMessage = await conn.next(timeout);
    }
    const first = authRequest(firstMessage);
    if (first.code !== 10) throw new Error(`expected AuthenticationSASL, got code ${first.code}`);
    const mechanisms = first.payload.toString('utf8').split('\0').filter(Boolean);
    if (!mechanisms.includes(SCRAM_SHA_256)) throw new Error(`SCRAM-SHA-256 not offered: ${mechanisms.join(', ')}`);
    const scram = new ScramClientExchange({ password: options.password });
    conn.write(saslInitialResponse(SCRAM_SHA_256, scram.clientFirst()));
    const cont = authRequest(await conn.next(timeout));
    if (cont.code !== 11) throw new Error(`expected AuthenticationSASLContinue, got code ${cont.code}`);
    const final = saslResponse(scram.handleServerFirst(cont.payload.toString('utf8')));
    conn.write(options.pipelined ? Buffer.concat([final, options.pipelined]) : final);
    const fin = authRequest(await conn.next(timeout));
    if (fin.code !== 12) throw new Error(`expected AuthenticationSASLFinal, got code ${fin.code}`);
    scram.verifyServerFinal(fin.payload.toString('utf8'));
    const ok = authRequest(await conn.next(timeout));
    if (ok.code !== 0) throw new Error(`expected AuthenticationOk, got code ${ok.code}`);
    const rest = await conn.until('Z', timeout);
    options.afterAuth?.push(...rest);
    const err = rest.find((m) => m.type === 'E');
    if (err) throw new Error(`login failed: ${JSON.stringify(errorFields(err))}`);
    return conn;
  } catch (err) {
    conn.destroy();
    throw err;
  }
}
