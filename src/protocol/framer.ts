/**
 * Splits a byte stream into typed protocol messages (1-byte type, Int32 length including itself).
 *
 * Pure and allocation-light: a message that lies wholly inside one chunk is handed out as a
 * (buffer, start, end) view of that chunk, so the relay can forward runs of messages as slices
 * without copying. Only a message split across chunks is assembled into its own buffer.
 */
export class FramingError extends Error {
  constructor(
    message: string,
    readonly code: 'bad-length' | 'too-long',
  ) {
    super(message);
    this.name = 'FramingError';
  }
}

/** Called once per complete message; `buf[start]` is the type byte, `end` is exclusive. */
export type MessageHandler = (type: number, buf: Buffer, start: number, end: number) => void;

export class MessageFramer {
  /**
   * Pieces of a message split across chunks, or null. Kept as pieces and joined once complete, so
   * memory grows with the bytes actually received, not with the length a peer announces.
   */
  private parts: Buffer[] | null = null;
  private partialTotal = 0;
  private partialFilled = 0;
  /**
   * Up to 4 header bytes seen before a partial message's length is known. Not from the shared
   * Buffer pool: a long-lived 5-byte slice would keep a whole 8 KiB pool slab alive per idle
   * connection (measured: ~1.9 KiB of RSS per idle client).
   */
  private readonly header = Buffer.allocUnsafeSlow(5);
  private headerFilled = 0;

  constructor(private maxMessageLength: number) {}

  setMaxMessageLength(limit: number): void {
    this.maxMessageLength = limit;
  }

  /** True when bytes of an unfinished message are buffered. */
  get hasPartial(): boolean {
    return this.headerFilled > 0 || this.parts !== null;
  }

  /** Bytes currently held for an unfinished message. */
  get bufferedBytes(): number {
    return this.parts ? this.partialFilled : this.headerFilled;
  }

  /** Hands out the bytes of an unfinished message and forgets them (when the stream stops being framed). */
  takeBuffered(): Buffer | null {
    const held = this.parts ? Buffer.concat(this.parts) : this.headerFilled > 0 ? Buffer.from(this.header.subarray(0, this.headerFilled)) : null;
    this.parts = null;
    this.partialFilled = 0;
    this.headerFilled = 0;
    return held;
  }

  push(chunk: Buffer, onMessage: MessageHandler): void {
    let pos = 0;
    const len = chunk.length;
    if (this.headerFilled > 0 || this.parts) pos = this.continuePartial(chunk, onMessage);
    while (pos < len) {
      if (len - pos < 5) {
        chunk.copy(this.header, 0, pos, len);
        this.headerFilled = len - pos;
        return;
      }
      const type = chunk[pos];
      const msgLen = chunk.readInt32BE(pos + 1);
      this.checkLength(type, msgLen);
      const end = pos + 1 + msgLen;
      if (end <= len) {
        onMessage(type, chunk, pos, end);
        pos = end;
      } else {
        this.parts = [chunk.subarray(pos, len)];
        this.partialTotal = 1 + msgLen;
        this.partialFilled = len - pos;
        return;
      }
    }
  }

  /** Completes a message begun in an earlier chunk; returns the position after it. */
  private continuePartial(chunk: Buffer, onMessage: MessageHandler): number {
    let pos = 0;
    if (!this.parts) {
      const need = 5 - this.headerFilled;
      const take = Math.min(need, chunk.length);
      chunk.copy(this.header, this.headerFilled, 0, take);
      this.headerFilled += take;
      pos = take;
      if (this.headerFilled < 5) return pos;
      const type = this.header[0];
      const msgLen = this.header.readInt32BE(1);
      this.checkLength(type, msgLen);
      this.parts = [Buffer.from(this.header)];
      this.partialTotal = 1 + msgLen;
      this.partialFilled = 5;
      this.headerFilled = 0;
    }
    const parts = this.parts;
    const take = Math.min(this.partialTotal - this.partialFilled, chunk.length - pos);
    if (take > 0) parts.push(chunk.subarray(pos, pos + take));
    this.partialFilled += take;
    pos += take;
    if (this.partialFilled === this.partialTotal) {
      const whole = parts.length === 1 ? parts[0] : Buffer.concat(parts, this.partialTotal);
      this.parts = null;
      this.partialFilled = 0;
      onMessage(whole[0], whole, 0, whole.length);
    }
    return pos;
  }

  private checkLength(type: number, msgLen: number): void {
    if (msgLen < 4) {
      throw new FramingError(`invalid message length ${msgLen} for message type 0x${type.toString(16)}`, 'bad-length');
    }
    if (msgLen > this.maxMessageLength) {
      throw new FramingError(
        `message of type 0x${type.toString(16)} is ${msgLen} bytes, above the limit of ${this.maxMessageLength}`,
        'too-long',
      );
    }
  }
}
