/** Small growable buffer for encoding messages. Pure. */
export class MessageWriter {
  private buf: Buffer;
  private pos = 0;
  private start = -1;

  constructor(initialSize = 256) {
    this.buf = Buffer.allocUnsafe(initialSize);
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }

  /** Begins a typed message; `type` < 0 begins an untyped (startup-phase) packet. */
  begin(type: number): this {
    if (type >= 0) {
      this.ensure(1);
      this.buf[this.pos++] = type;
    }
    this.start = this.pos;
    this.ensure(4);
    this.pos += 4;
    return this;
  }

  /** Ends the current message by filling in its length. */
  end(): this {
    this.buf.writeInt32BE(this.pos - this.start, this.start);
    this.start = -1;
    return this;
  }

  int8(v: number): this {
    this.ensure(1);
    this.buf[this.pos++] = v;
    return this;
  }

  int16(v: number): this {
    this.ensure(2);
    this.buf.writeInt16BE(v, this.pos);
    this.pos += 2;
    return this;
  }

  int32(v: number): this {
    this.ensure(4);
    this.buf.writeInt32BE(v, this.pos);
    this.pos += 4;
    return this;
  }

  /** A NUL-terminated UTF-8 string. */
  cstring(s: string): this {
    const n = Buffer.byteLength(s);
    this.ensure(n + 1);
    this.buf.write(s, this.pos, 'utf8');
    this.pos += n;
    this.buf[this.pos++] = 0;
    return this;
  }

  bytes(b: Uint8Array): this {
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
    return this;
  }

  /** The encoded bytes (a copy, so the writer may be reused). */
  toBuffer(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.pos));
  }
}
