/**
 * Tests of the pure ClientHello peeker used for TLS passthrough, against ClientHellos captured
 * from real Node TLS clients plus synthetic and fuzzed inputs.
 */
import { before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import fc from 'fast-check';
import { looksLikeTls, parseClientHello, type ClientHelloResult } from '../../src/protocol/tls-client-hello.js';

/** Starts a plain TCP server, connects a TLS client to it and returns the bytes of its ClientHello. */
async function captureClientHello(options: Omit<tls.ConnectionOptions, 'host' | 'port'>): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no ClientHello within 5 s')), 5000);
      server.on('connection', (sock) => {
        let buf = Buffer.alloc(0);
        sock.on('error', () => {});
        sock.on('data', (chunk: Buffer) => {
          buf = Buffer.concat([buf, chunk]);
          const r = parseClientHello(buf);
          if (r.kind === 'incomplete') return;
          clearTimeout(timer);
          sock.destroy();
          if (r.kind === 'hello') resolve(buf.subarray(0, r.length));
          else reject(new Error(`captured bytes did not parse: ${r.reason}`));
        });
      });
      const client = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...options });
      client.on('error', () => {}); // the server hangs up mid-handshake
      client.on('close', () => client.destroy());
    });
  } finally {
    server.close();
  }
}

type Hello = Extract<ClientHelloResult, { kind: 'hello' }>;

function expectHello(r: ClientHelloResult): Hello {
  assert.equal(r.kind, 'hello', JSON.stringify(r));
  return r as Hello;
}

function expectNotTls(r: ClientHelloResult, reason?: RegExp): void {
  assert.equal(r.kind, 'not-tls', JSON.stringify(r));
  if (reason && r.kind === 'not-tls') assert.match(r.reason, reason);
}

/** Re-frames a single-record ClientHello into records holding the given handshake byte counts (rest in the last). */
function reframe(hello: Buffer, sizes: number[]): Buffer {
  const payload = hello.subarray(5);
  const out: Buffer[] = [];
  let pos = 0;
  for (const size of [...sizes, payload.length]) {
    const n = Math.min(size, payload.length - pos);
    if (n <= 0) break;
    out.push(Buffer.from([0x16, 0x03, 0x03, n >> 8, n & 0xff]), payload.subarray(pos, pos + n));
    pos += n;
  }
  return Buffer.concat(out);
}

function u16(n: number): Buffer {
  return Buffer.from([n >> 8, n & 0xff]);
}

function vec16(...parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  return Buffer.concat([u16(body.length), body]);
}

function ext(type: number, data: Buffer): Buffer {
  return Buffer.concat([u16(type), vec16(data)]);
}

function sniExt(...names: Array<Buffer | string>): Buffer {
  const entries = names.map((n) => {
    const b = typeof n === 'string' ? Buffer.from(n, 'latin1') : n;
    return Buffer.concat([Buffer.from([0]), vec16(b)]);
  });
  return ext(0, vec16(...entries));
}

function alpnExt(...protos: string[]): Buffer {
  return ext(16, vec16(...protos.map((p) => Buffer.concat([Buffer.from([p.length]), Buffer.from(p, 'latin1')]))));
}

/** A minimal synthetic ClientHello in one record; `extensions` null means no extensions block. */
function buildHello(extensions: Buffer[] | null, legacyVersion = 0x0303): Buffer {
  const body = Buffer.concat([
    u16(legacyVersion),
    Buffer.alloc(32, 7), // random
    Buffer.from([0]), // session_id
    vec16(u16(0x1301)), // cipher_suites
    Buffer.from([1, 0]), // compression_methods
    ...(extensions ? [vec16(...extensions)] : []),
  ]);
  const hs = Buffer.concat([Buffer.from([1, body.length >> 16, (body.length >> 8) & 0xff, body.length & 0xff]), body]);
  return Buffer.concat([Buffer.from([0x16, 0x03, 0x01]), u16(hs.length), hs]);
}

describe('TLS ClientHello peeking', () => {
  let withSni: Buffer;
  let noSni: Buffer;
  let manyAlpn: Buffer;
  let tls12: Buffer;

  before(async () => {
    withSni = await captureClientHello({ servername: 'db.example.com', ALPNProtocols: ['postgresql'] });
    noSni = await captureClientHello({ ALPNProtocols: ['postgresql'] });
    manyAlpn = await captureClientHello({ servername: 'Primary.DB.example.com', ALPNProtocols: ['postgresql', 'h2', 'x-custom/1'] });
    tls12 = await captureClientHello({ servername: 'legacy.example.com', maxVersion: 'TLSv1.2' });
  });

  test('looksLikeTls accepts only the handshake record type', () => {
    assert.equal(looksLikeTls(0x16), true);
    assert.equal(looksLikeTls(0x00), false); // SSLRequest / StartupMessage length byte
    assert.equal(looksLikeTls(0x17), false);
  });

  test('real ClientHello: SNI and ALPN "postgresql"', () => {
    const r = expectHello(parseClientHello(withSni));
    assert.equal(r.serverName, 'db.example.com');
    assert.deepEqual(r.alpn, ['postgresql']);
    assert.equal(r.length, withSni.length);
    assert.equal(r.legacyVersion, 0x0303);
  });

  test('real ClientHello to an IP address without servername carries no SNI', () => {
    const r = expectHello(parseClientHello(noSni));
    assert.equal(r.serverName, null);
    assert.deepEqual(r.alpn, ['postgresql']);
  });

  test('real ClientHello with several ALPN protocols; server name lower-cased', () => {
    const r = expectHello(parseClientHello(manyAlpn));
    assert.equal(r.serverName, 'primary.db.example.com');
    assert.deepEqual(r.alpn, ['postgresql', 'h2', 'x-custom/1']);
  });

  test('real TLS 1.2-only ClientHello without ALPN', () => {
    const r = expectHello(parseClientHello(tls12));
    assert.equal(r.serverName, 'legacy.example.com');
    assert.deepEqual(r.alpn, []);
    assert.equal(r.legacyVersion, 0x0303);
  });

  test('bytes after the ClientHello are not consumed', () => {
    const r = expectHello(parseClientHello(Buffer.concat([withSni, Buffer.from([0x16, 0x03, 0x03, 0, 1, 2, 9, 9])])));
    assert.equal(r.length, withSni.length);
    assert.equal(r.serverName, 'db.example.com');
  });

  test('every prefix is incomplete with a need beyond it, then the full result', () => {
    for (const hello of [withSni, noSni, manyAlpn, tls12]) {
      const full = parseClientHello(hello);
      for (let n = 0; n < hello.length; n++) {
        const r = parseClientHello(hello.subarray(0, n));
        assert.equal(r.kind, 'incomplete', `prefix ${n}: ${JSON.stringify(r)}`);
        if (r.kind === 'incomplete') assert.ok(r.need > n && r.need <= hello.length, `prefix ${n}: need ${r.need}`);
      }
      assert.deepEqual(parseClientHello(hello), full);
    }
  });

  test('random chunking: incomplete until the last chunk, then the same result', () => {
    const full = parseClientHello(manyAlpn);
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 200 }), { minLength: 1, maxLength: 30 }), (sizes) => {
        let have = 0;
        for (const size of sizes) {
          have = Math.min(manyAlpn.length, have + size);
          const r = parseClientHello(manyAlpn.subarray(0, have));
          if (have < manyAlpn.length) assert.equal(r.kind, 'incomplete');
          else assert.deepEqual(r, full);
        }
      }),
      { numRuns: 200, seed: 160517 },
    );
  });

  test('a handshake split across several TLS records gives the same result', () => {
    const single = expectHello(parseClientHello(withSni));
    const payloadLen = withSni.length - 5;
    const splits = [[1], [2], [3], [4], [40], [Math.floor(payloadLen / 2)], [payloadLen - 1], [1, 1, 1], [10, 100, 7]];
    for (const sizes of splits) {
      const framed = reframe(withSni, sizes);
      const r = expectHello(parseClientHello(framed));
      assert.deepEqual({ ...r, length: 0 }, { ...single, length: 0 }, `split ${sizes}`);
      assert.equal(r.length, framed.length);
      for (let n = 0; n < framed.length; n++) assert.equal(parseClientHello(framed.subarray(0, n)).kind, 'incomplete');
    }
    // One record per handshake byte.
    const tiny = reframe(withSni, Array<number>(payloadLen).fill(1));
    assert.equal(expectHello(parseClientHello(tiny, tiny.length)).serverName, 'db.example.com');
  });

  test('a non-handshake record in the middle of the ClientHello is rejected', () => {
    const framed = reframe(withSni, [50]);
    const bad = Buffer.from(framed);
    bad[5 + 50] = 0x17;
    expectNotTls(parseClientHello(bad), /record type 23/);
    expectNotTls(parseClientHello(bad.subarray(0, 5 + 50 + 1)), /record type 23/); // detected early
  });

  test('maxBytes bounds the ClientHello', () => {
    expectNotTls(parseClientHello(withSni, withSni.length - 1), /too large/);
    expectHello(parseClientHello(withSni, withSni.length));
    // A handshake declaring 1 MiB is refused as soon as its header is seen.
    const huge = Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x10, 0x00, 0x00]);
    expectNotTls(parseClientHello(huge), /too large/);
    // A record over 2^14 bytes is not valid TLS.
    expectNotTls(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x40, 0x01, 0x01])), /record too long/);
  });

  test('synthetic ClientHellos: extensions, no extensions, validation', () => {
    const r = expectHello(parseClientHello(buildHello([alpnExt('postgresql'), sniExt('Db-1.Example.COM')], 0x0301)));
    assert.equal(r.serverName, 'db-1.example.com');
    assert.deepEqual(r.alpn, ['postgresql']);
    assert.equal(r.legacyVersion, 0x0301);

    const bare = expectHello(parseClientHello(buildHello(null)));
    assert.equal(bare.serverName, null);
    assert.deepEqual(bare.alpn, []);

    // First host_name wins.
    assert.equal(expectHello(parseClientHello(buildHello([sniExt('a.example', 'b.example')]))).serverName, 'a.example');

    expectNotTls(parseClientHello(buildHello([sniExt(Buffer.from('db.example.com\0evil.com', 'latin1'))])), /NUL/);
    expectNotTls(parseClientHello(buildHello([sniExt('db example')])), /invalid character/);
    expectNotTls(parseClientHello(buildHello([sniExt('db..example')])), /empty label/);
    expectNotTls(parseClientHello(buildHello([sniExt('db.example.')])), /empty label/);
    expectNotTls(parseClientHello(buildHello([sniExt('')])), /empty server name/);
    expectNotTls(parseClientHello(buildHello([sniExt(`${'a'.repeat(64)}.com`)])), /label too long/);
    expectNotTls(parseClientHello(buildHello([alpnExt('postgresql', '')])), /empty ALPN/);
    expectNotTls(parseClientHello(buildHello([ext(16, Buffer.alloc(0))])), /truncated ALPN/);
    expectNotTls(parseClientHello(buildHello([ext(0, u16(0))])), /server_name_list/);
    expectNotTls(parseClientHello(buildHello([alpnExt('a'), alpnExt('b')])), /duplicate extension 16/);
    expectNotTls(parseClientHello(buildHello([alpnExt('a')], 0x0200)), /version/);
  });

  test('inner lengths that overrun their container are rejected', () => {
    const hello = buildHello([alpnExt('postgresql')]);
    // The ALPN list length claims one byte more than the extension holds.
    const bad = Buffer.from(hello);
    const listLenAt = hello.length - 'postgresql'.length - 1 - 2;
    bad.writeUInt16BE(bad.readUInt16BE(listLenAt) + 1, listLenAt);
    expectNotTls(parseClientHello(bad), /ALPN/);
    // Handshake length shorter than the body: extensions overrun the ClientHello.
    const short = Buffer.from(hello);
    short[8] -= 1;
    expectNotTls(parseClientHello(short));
    // A handshake message that is not a ClientHello.
    const serverHello = Buffer.from(hello);
    serverHello[5] = 2;
    expectNotTls(parseClientHello(serverHello), /not ClientHello/);
    expectNotTls(parseClientHello(serverHello.subarray(0, 6)), /not ClientHello/);
  });

  test('PostgreSQL startup bytes and garbage are not TLS', () => {
    const sslRequest = Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    expectNotTls(parseClientHello(sslRequest), /not a TLS handshake record/);
    const startup = Buffer.concat([Buffer.from([0, 0, 0, 0x17, 0, 3, 0, 0]), Buffer.from('user\0alice\0\0')]);
    expectNotTls(parseClientHello(startup));
    expectNotTls(parseClientHello(Buffer.from('GET / HTTP/1.1\r\n\r\n')));
    expectNotTls(parseClientHello(Buffer.from([0x16, 0x02])), /record version/);
    expectNotTls(parseClientHello(Buffer.from([0x16, 0x03, 0x00])), /record version/);
    expectNotTls(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x00])), /empty handshake record/);
    assert.deepEqual(parseClientHello(Buffer.alloc(0)), { kind: 'incomplete', need: 5 });
  });

  test('fuzz: mutations and truncations never throw or report an out-of-range result', () => {
    const seeds = [withSni, noSni, manyAlpn, tls12, reframe(withSni, [3, 60])];
    const check = (input: Buffer, maxBytes: number): void => {
      const r = parseClientHello(input, maxBytes);
      if (r.kind === 'hello') {
        assert.ok(r.length >= 9 && r.length <= input.length && r.length <= maxBytes, `length ${r.length}`);
        assert.ok(r.serverName === null || /^[a-z0-9._-]+$/.test(r.serverName));
      } else if (r.kind === 'incomplete') {
        assert.ok(r.need > input.length && r.need <= maxBytes, `need ${r.need} for ${input.length}`);
      } else {
        assert.equal(r.kind, 'not-tls');
        assert.ok(r.reason.length > 0);
      }
    };
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: seeds.length - 1 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
        fc.option(fc.nat()),
        fc.integer({ min: 0, max: 20000 }),
        (which, edits, cut, maxBytes) => {
          const bytes = Buffer.from(seeds[which]);
          for (const [at, value] of edits) bytes[at % bytes.length] = value;
          const input = cut === null ? bytes : bytes.subarray(0, cut % (bytes.length + 1));
          check(input, 16 * 1024 + 5);
          check(input, maxBytes);
        },
      ),
      { numRuns: 500, seed: 1605 },
    );
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 400 }), (raw) => {
        check(Buffer.concat([Buffer.from([0x16, 0x03, 0x01]), Buffer.from(raw)]), 16 * 1024 + 5);
        check(Buffer.from(raw), 16 * 1024 + 5);
      }),
      { numRuns: 300, seed: 1606 },
    );
  });
});
