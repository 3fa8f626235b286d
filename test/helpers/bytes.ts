/** Byte builders for tests that write protocol bytes by hand. */

export const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

/** A NUL-terminated string. */
export const cstr = (s: string | Uint8Array): Buffer => Buffer.concat([typeof s === 'string' ? Buffer.from(s, 'utf8') : Buffer.from(s), Buffer.from([0])]);

export const i16 = (n: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeInt16BE(n);
  return b;
};

export const i32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n | 0);
  return b;
};

/** A typed message: type byte, Int32 length (body + 4), body. */
export function msg(type: string | number, ...body: Buffer[]): Buffer {
  const b = Buffer.concat(body);
  return Buffer.concat([Buffer.from([typeof type === 'string' ? type.charCodeAt(0) : type]), i32(b.length + 4), b]);
}

/** An untyped startup-phase packet: Int32 length (incl. itself), then the body. */
export function packet(...body: Buffer[]): Buffer {
  const b = Buffer.concat(body);
  return Buffer.concat([i32(b.length + 4), b]);
}
