/**
 * Byte-level tests of the pure wire codec: framing, startup packets, encoders, decoders and the
 * statement-name rewrites used by transaction pooling.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FramingError, MessageFramer } from '../../src/protocol/framer.js';
import {
  decodeStartupPacket,
  MAX_STARTUP_PACKET_LENGTH,
  startupPacketLength,
  StartupError,
  type StartupPacket,
} from '../../src/protocol/startup.js';
import {
  authenticationCleartext,
  authenticationMD5,
  authenticationOk,
  authenticationSASL,
  authenticationSASLContinue,
  authenticationSASLFinal,
  backendKeyData,
  closeComplete,
  commandComplete,
  dataRow,
  decodeCommandTag,
  decodeError,
  decodeNoticeFields,
  decodeParameterStatus,
  emptyQueryResponse,
  errorResponse,
  negotiateProtocolVersion,
  noticeResponse,
  parameterStatus,
  parseComplete,
  readyForQuery,
  rowDescription,
} from '../../src/protocol/backend.js';
import {
  cancelRequest,
  closeMessage,
  decodeBindNames,
  decodeParse,
  decodePassword,
  decodeQuery,
  decodeSASLInitialResponse,
  decodeTarget,
  describeMessage,
  MalformedMessageError,
  parseMessageForInternalQuery,
  passwordMessage,
  queryMessage,
  readCString,
  rewriteBind,
  rewriteParse,
  saslInitialResponse,
  saslResponse,
  sslRequest,
  startupMessage,
  syncMessage,
  terminateMessage,
} from '../../src/protocol/frontend.js';
import { MessageWriter } from '../../src/protocol/writer.js';
import { TxStatus } from '../../src/protocol/constants.js';
import { PgError } from '../../src/protocol/sqlstate.js';
import { hex, cstr, i16, i32, msg, packet } from '../helpers/bytes.js';

// ------------------------------------------------------------------ helpers (independent of the codec)




interface Seen {
  type: number;
  bytes: Buffer;
  buf: Buffer;
  start: number;
  end: number;
}

function pushAll(framer: MessageFramer, chunks: Buffer[]): Seen[] {
  const out: Seen[] = [];
  for (const c of chunks) {
    framer.push(c, (type, buf, start, end) => out.push({ type, bytes: Buffer.from(buf.subarray(start, end)), buf, start, end }));
  }
  return out;
}

function assertFramingError(fn: () => unknown, code: 'bad-length' | 'too-long'): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FramingError, `expected FramingError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  });
}

function assertStartupError(fn: () => unknown, message?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof StartupError, `expected StartupError, got ${String(err)}`);
    if (message) assert.match(err.message, message);
    return true;
  });
}

function assertMalformed(fn: () => unknown, message?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof MalformedMessageError, `expected MalformedMessageError, got ${String(err)}`);
    if (message) assert.match(err.message, message);
    return true;
  });
}

/** Embeds a message in a larger buffer so that decoders are exercised with start > 0. */
function embedded(m: Buffer, before = 7, after = 5): { buf: Buffer; start: number; end: number } {
  const buf = Buffer.concat([Buffer.alloc(before, 0xaa), m, Buffer.alloc(after, 0xbb)]);
  return { buf, start: before, end: before + m.length };
}

// A small stream of varied messages: header-only, short, longer, binary.
const STREAM_MESSAGES = [
  msg('Q', cstr('select 1')),
  msg('S'),
  msg('P', cstr('s1'), cstr('select $1::int'), i16(1), i32(23)),
  msg('H'),
  msg('d', Buffer.from([0, 1, 2, 3, 0xff, 0xfe, 0])),
  msg('X'),
];
const STREAM = Buffer.concat(STREAM_MESSAGES);

// ------------------------------------------------------------------ MessageFramer

describe('MessageFramer', () => {
  test('a stream split at every byte boundary (incl. inside the 5-byte header) yields the same messages', () => {
    for (let i = 0; i <= STREAM.length; i++) {
      const framer = new MessageFramer(1 << 20);
      const seen = pushAll(framer, [STREAM.subarray(0, i), STREAM.subarray(i)]);
      assert.deepEqual(
        seen.map((s) => s.bytes),
        STREAM_MESSAGES,
        `split at ${i}`,
      );
      assert.equal(framer.hasPartial, false);
      assert.equal(framer.bufferedBytes, 0);
    }
  });

  test('every pair of split points', () => {
    for (let i = 0; i <= STREAM.length; i++) {
      for (let j = i; j <= STREAM.length; j++) {
        const framer = new MessageFramer(1 << 20);
        const seen = pushAll(framer, [STREAM.subarray(0, i), STREAM.subarray(i, j), STREAM.subarray(j)]);
        assert.deepEqual(
          seen.map((s) => s.bytes),
          STREAM_MESSAGES,
          `split at ${i}, ${j}`,
        );
      }
    }
  });

  test('one byte at a time', () => {
    const framer = new MessageFramer(1 << 20);
    const chunks = [...STREAM].map((b) => Buffer.from([b]));
    const seen: Seen[] = [];
    let offset = 0;
    let boundary = 0;
    const boundaries = STREAM_MESSAGES.map((m) => (boundary += m.length));
    for (const c of chunks) {
      seen.push(...pushAll(framer, [c]));
      offset++;
      const completed = boundaries.filter((b) => b <= offset).length;
      assert.equal(seen.length, completed);
      const pendingStart = completed === 0 ? 0 : boundaries[completed - 1];
      assert.equal(framer.hasPartial, offset > pendingStart);
      assert.equal(framer.bufferedBytes, offset - pendingStart);
    }
    assert.deepEqual(
      seen.map((s) => s.bytes),
      STREAM_MESSAGES,
    );
  });

  test('random chunkings of random messages (property)', () => {
    const message = fc
      .tuple(fc.integer({ min: 0x20, max: 0x7e }), fc.uint8Array({ maxLength: 300 }))
      .map(([t, body]) => msg(t, Buffer.from(body)));
    fc.assert(
      fc.property(fc.array(message, { minLength: 1, maxLength: 20 }), fc.array(fc.nat(), { maxLength: 10 }), (messages, cuts) => {
        const all = Buffer.concat(messages);
        const points = [...new Set(cuts.map((c) => c % (all.length + 1)))].sort((a, b) => a - b);
        const chunks: Buffer[] = [];
        let prev = 0;
        for (const p of points) {
          chunks.push(all.subarray(prev, p));
          prev = p;
        }
        chunks.push(all.subarray(prev));
        const seen = pushAll(new MessageFramer(1 << 20), chunks);
        assert.deepEqual(
          seen.map((s) => s.bytes),
          messages,
        );
        for (const s of seen) assert.equal(s.type, s.bytes[0]);
      }),
      { numRuns: 300, seed: 20240601 },
    );
  });

  test('many messages in one chunk, each handed out as a view of that same chunk (zero-copy)', () => {
    const messages: Buffer[] = [];
    for (let i = 0; i < 1000; i++) messages.push(i % 3 === 0 ? msg('S') : msg('Q', cstr(`select ${i}`)));
    const chunk = Buffer.concat(messages);
    const seen = pushAll(new MessageFramer(1 << 20), [chunk]);
    assert.equal(seen.length, 1000);
    let pos = 0;
    for (let i = 0; i < seen.length; i++) {
      const s = seen[i];
      assert.equal(s.buf, chunk, 'same buffer object, not a copy');
      assert.equal(s.start, pos);
      assert.equal(s.end, pos + messages[i].length);
      assert.equal(s.type, messages[i][0]);
      pos = s.end;
    }
    assert.equal(pos, chunk.length);
  });

  test('a message completed across chunks is assembled into its own buffer; later ones are views again', () => {
    const a = msg('Q', cstr('select 1'));
    const b = msg('S');
    const c = msg('Q', cstr('select 2'));
    const first = Buffer.concat([a.subarray(0, 3)]);
    const second = Buffer.concat([a.subarray(3), b, c]);
    const framer = new MessageFramer(1 << 20);
    const seen = pushAll(framer, [first, second]);
    assert.equal(seen.length, 3);
    assert.notEqual(seen[0].buf, first);
    assert.notEqual(seen[0].buf, second);
    assert.equal(seen[0].start, 0);
    assert.equal(seen[0].end, a.length);
    assert.equal(seen[0].buf.length, a.length);
    assert.deepEqual(seen[0].bytes, a);
    assert.equal(seen[1].buf, second);
    assert.equal(seen[1].start, a.length - 3);
    assert.equal(seen[2].buf, second);
    assert.deepEqual(seen[2].bytes, c);
  });

  test('the handler receives the message at an offset of a chunk that starts mid-stream', () => {
    const framer = new MessageFramer(1 << 20);
    const big = Buffer.concat([Buffer.alloc(10), msg('S'), msg('H')]);
    const seen = pushAll(framer, [big.subarray(10)]);
    assert.deepEqual(
      seen.map((s) => [s.start, s.end]),
      [
        [0, 5],
        [5, 10],
      ],
    );
  });

  test('empty chunks are harmless, also in the middle of a header', () => {
    const framer = new MessageFramer(1 << 20);
    const m = msg('Q', cstr('x'));
    const seen = pushAll(framer, [Buffer.alloc(0), m.subarray(0, 2), Buffer.alloc(0), m.subarray(2), Buffer.alloc(0)]);
    assert.deepEqual(
      seen.map((s) => s.bytes),
      [m],
    );
  });

  test('lengths below 4 are rejected with bad-length, whole or split inside the header', () => {
    for (const len of [-1, 0, 1, 2, 3, -0x80000000]) {
      const bad = Buffer.concat([Buffer.from('Q'), i32(len)]);
      assertFramingError(() => new MessageFramer(1 << 20).push(bad, () => undefined), 'bad-length');
      for (let cut = 1; cut < 5; cut++) {
        const framer = new MessageFramer(1 << 20);
        framer.push(bad.subarray(0, cut), () => assert.fail('nothing complete yet'));
        assertFramingError(() => framer.push(bad.subarray(cut), () => undefined), 'bad-length');
      }
    }
  });

  test('messages before a bad one in the same chunk are still delivered', () => {
    const good = msg('S');
    const seen: number[] = [];
    assertFramingError(
      () => new MessageFramer(1 << 20).push(Buffer.concat([good, Buffer.from('Q'), i32(2)]), (t) => seen.push(t)),
      'bad-length',
    );
    assert.deepEqual(seen, [0x53]);
  });

  test('a length above the limit is rejected with too-long as soon as the header is known', () => {
    const limit = 1024;
    const framer = new MessageFramer(limit);
    // Exactly at the limit: accepted.
    const atLimit = msg('d', Buffer.alloc(limit - 4, 1));
    assert.equal(pushAll(framer, [atLimit]).length, 1);
    // One byte above, announced only: no body needed to fail.
    const header = Buffer.concat([Buffer.from('d'), i32(limit + 1)]);
    assertFramingError(() => new MessageFramer(limit).push(header, () => undefined), 'too-long');
    // Header split across chunks.
    const split = new MessageFramer(limit);
    split.push(header.subarray(0, 2), () => undefined);
    assertFramingError(() => split.push(header.subarray(2), () => undefined), 'too-long');
    // Huge announced length (2 GiB - 1) never allocates.
    assertFramingError(() => new MessageFramer(limit).push(Buffer.concat([Buffer.from('d'), i32(0x7fffffff)]), () => undefined), 'too-long');
  });

  test('setMaxMessageLength changes the limit for later messages', () => {
    const framer = new MessageFramer(100);
    const m = msg('d', Buffer.alloc(200));
    assertFramingError(() => framer.push(m, () => undefined), 'too-long');
    const framer2 = new MessageFramer(100);
    framer2.setMaxMessageLength(1000);
    assert.equal(pushAll(framer2, [m]).length, 1);
  });
});

// ------------------------------------------------------------------ startup packets

describe('startup packets', () => {
  const SSL = hex('00000008 04d2162f');
  const GSS = hex('00000008 04d21630');

  test('startupPacketLength: waits for 4 bytes and for the whole packet; rejects impossible lengths', () => {
    assert.equal(startupPacketLength(Buffer.alloc(0)), 0);
    assert.equal(startupPacketLength(hex('000000')), 0);
    assert.equal(startupPacketLength(hex('00000008 04d216')), 0);
    assert.equal(startupPacketLength(SSL), 8);
    assert.equal(startupPacketLength(Buffer.concat([SSL, hex('4142')])), 8);
    assert.equal(startupPacketLength(i32(MAX_STARTUP_PACKET_LENGTH)), 0);
    for (const len of [-1, 0, 3, 4, 7, MAX_STARTUP_PACKET_LENGTH + 1, 100000, 0x7fffffff]) {
      assertStartupError(() => startupPacketLength(i32(len)), /invalid length of startup packet/);
    }
  });

  test('SSLRequest and GSSENCRequest', () => {
    assert.deepEqual(decodeStartupPacket(SSL), { kind: 'ssl' });
    assert.deepEqual(decodeStartupPacket(GSS), { kind: 'gssenc' });
    assert.deepEqual(sslRequest(), SSL);
    assertStartupError(() => decodeStartupPacket(packet(hex('04d2162f 00000000'))), /SSLRequest/);
    assertStartupError(() => decodeStartupPacket(packet(hex('04d21630 00'))), /GSSENCRequest/);
  });

  test('CancelRequest with a 4-byte (3.0) and a 32-byte (3.2) key', () => {
    const key4 = hex('deadbeef');
    const p4 = hex('00000010 04d2162e 00003039 deadbeef');
    assert.deepEqual(cancelRequest(12345, key4), p4);
    const d4 = decodeStartupPacket(p4) as Extract<StartupPacket, { kind: 'cancel' }>;
    assert.equal(d4.kind, 'cancel');
    assert.equal(d4.processId, 12345);
    assert.deepEqual(d4.secretKey, key4);

    const key32 = Buffer.from(Array.from({ length: 32 }, (_, i) => i * 7));
    const p32 = cancelRequest(-2, key32);
    assert.equal(p32.length, 44);
    assert.equal(p32.readInt32BE(0), 44);
    const d32 = decodeStartupPacket(p32) as Extract<StartupPacket, { kind: 'cancel' }>;
    assert.equal(d32.processId, -2);
    assert.deepEqual(d32.secretKey, key32);
    // The key is a copy: changing the packet later does not change it.
    p32[20] ^= 0xff;
    assert.deepEqual(d32.secretKey, key32);

    // 256 bytes is the longest key; shorter than 4 or longer than 256 is wrong.
    assert.equal((decodeStartupPacket(cancelRequest(1, Buffer.alloc(256, 1))) as { secretKey: Buffer }).secretKey.length, 256);
    assertStartupError(() => decodeStartupPacket(cancelRequest(1, Buffer.alloc(257))), /CancelRequest/);
    assertStartupError(() => decodeStartupPacket(cancelRequest(1, Buffer.alloc(3))), /CancelRequest/);
    assertStartupError(() => decodeStartupPacket(hex('0000000c 04d2162e 00000001')), /CancelRequest/);
  });

  test('StartupMessage: parameters, _pq_ options, protocol 3.0 and 3.2', () => {
    const body = Buffer.concat([
      hex('00030000'),
      cstr('user'),
      cstr('app'),
      cstr('database'),
      cstr('db1'),
      cstr('application_name'),
      cstr('prüfung ✓'),
      cstr('_pq_.foo'),
      cstr('bar'),
      cstr('options'),
      cstr(''),
      Buffer.from([0]),
    ]);
    const p = packet(body);
    const d = decodeStartupPacket(p);
    assert.equal(d.kind, 'startup');
    if (d.kind !== 'startup') return;
    assert.equal(d.major, 3);
    assert.equal(d.minor, 0);
    assert.deepEqual(
      [...d.params],
      [
        ['user', 'app'],
        ['database', 'db1'],
        ['application_name', 'prüfung ✓'],
        ['options', ''],
      ],
    );
    assert.deepEqual([...d.options], [['_pq_.foo', 'bar']]);

    const p32 = startupMessage([['user', 'bob']], 196610);
    assert.deepEqual(p32, packet(hex('00030002'), cstr('user'), cstr('bob'), Buffer.from([0])));
    const d32 = decodeStartupPacket(p32);
    assert.ok(d32.kind === 'startup' && d32.major === 3 && d32.minor === 2);

    // A packet with only the terminator is well-formed (the session complains about the missing user).
    const empty = decodeStartupPacket(packet(hex('00030000 00')));
    assert.ok(empty.kind === 'startup' && empty.params.size === 0);
  });

  test('startupMessage encoder round-trips', () => {
    const params: [string, string][] = [
      ['user', 'alice'],
      ['database', 'x y'],
      ['client_encoding', 'UTF8'],
    ];
    const p = startupMessage(params);
    assert.equal(p.readInt32BE(0), p.length);
    assert.equal(p.readInt32BE(4), 196608);
    assert.equal(p[p.length - 1], 0);
    const d = decodeStartupPacket(p);
    assert.ok(d.kind === 'startup');
    assert.deepEqual([...d.params], params);
  });

  test('bad layouts', () => {
    const v3 = hex('00030000');
    // No terminator after the last value.
    assertStartupError(() => decodeStartupPacket(packet(v3, cstr('user'), cstr('app'))), /not terminated/);
    // No parameters and no terminator at all.
    assertStartupError(() => decodeStartupPacket(packet(v3)), /not terminated|terminator/);
    // A name at the end without a value.
    assertStartupError(() => decodeStartupPacket(packet(v3, cstr('user'), cstr('app'), cstr('database'))), /without value/);
    assertStartupError(() => decodeStartupPacket(packet(v3, Buffer.from('user'))), /without value/);
    // Unterminated value.
    assertStartupError(() => decodeStartupPacket(packet(v3, cstr('user'), Buffer.from('app'))), /layout|terminat/);
    // Bytes after the terminator.
    assertStartupError(() => decodeStartupPacket(packet(v3, cstr('user'), cstr('app'), Buffer.from([0]), Buffer.from('x'))), /terminator/);
    assertStartupError(() => decodeStartupPacket(packet(v3, Buffer.from([0, 0]))), /terminator/);
    // Declared length disagrees with the bytes given.
    const p = packet(v3, cstr('user'), cstr('app'), Buffer.from([0]));
    assertStartupError(() => decodeStartupPacket(Buffer.concat([p, Buffer.from([0])])), /mismatch/);
  });

  test('other protocol versions are refused', () => {
    for (const version of ['00020000', '00010000', '00040000', '00000000', 'ffff0003', '04d21631']) {
      assertStartupError(() => decodeStartupPacket(packet(hex(version), cstr('user'), cstr('app'), Buffer.from([0]))), /unsupported frontend protocol/);
    }
  });

  test('random packets either decode or throw StartupError (property)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 4, maxLength: 200 }), fc.constantFrom(0, 1, 2, 3), (body, prefix) => {
        const heads = [hex(''), hex('00030000'), hex('00030002'), hex('04d2162e')];
        const p = packet(heads[prefix], Buffer.from(body));
        try {
          decodeStartupPacket(p);
        } catch (err) {
          assert.ok(err instanceof StartupError, `unexpected ${String(err)}`);
        }
      }),
      { numRuns: 500, seed: 4242 },
    );
  });
});

// ------------------------------------------------------------------ backend encoders

describe('backend encoders (exact bytes)', () => {
  test('ReadyForQuery', () => {
    assert.deepEqual(readyForQuery(TxStatus.Idle), hex('5a 00000005 49'));
    assert.deepEqual(readyForQuery(), hex('5a 00000005 49'));
    assert.deepEqual(readyForQuery(TxStatus.InTransaction), hex('5a 00000005 54'));
    assert.deepEqual(readyForQuery(TxStatus.Failed), hex('5a 00000005 45'));
  });

  test('Authentication requests', () => {
    assert.deepEqual(authenticationOk(), hex('52 00000008 00000000'));
    assert.deepEqual(authenticationCleartext(), hex('52 00000008 00000003'));
    assert.deepEqual(authenticationMD5(hex('01020304')), hex('52 0000000c 00000005 01020304'));
    assert.deepEqual(authenticationSASL(['SCRAM-SHA-256']), Buffer.concat([hex('52 00000017 0000000a'), cstr('SCRAM-SHA-256'), hex('00')]));
    assert.deepEqual(
      authenticationSASL(['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256']),
      msg('R', i32(10), cstr('SCRAM-SHA-256-PLUS'), cstr('SCRAM-SHA-256'), hex('00')),
    );
    assert.deepEqual(authenticationSASLContinue('r=abc,s=xyz,i=4096'), msg('R', i32(11), Buffer.from('r=abc,s=xyz,i=4096')));
    assert.deepEqual(authenticationSASLContinue(hex('00ff')), hex('52 0000000a 0000000b 00ff'));
    assert.deepEqual(authenticationSASLFinal('v=sig'), msg('R', i32(12), Buffer.from('v=sig')));
  });

  test('ParameterStatus', () => {
    assert.deepEqual(parameterStatus('client_encoding', 'UTF8'), Buffer.concat([hex('53 00000019'), cstr('client_encoding'), cstr('UTF8')]));
    assert.deepEqual(parameterStatus('a', ''), hex('53 00000007 6100 00'));
    // Long values grow the writer past its initial 64 bytes.
    const long = 'x'.repeat(500);
    assert.deepEqual(parameterStatus('application_name', long), msg('S', cstr('application_name'), cstr(long)));
  });

  test('BackendKeyData with 4-, 32- and 256-byte keys', () => {
    assert.deepEqual(backendKeyData(0x01020304, hex('a1b2c3d4')), hex('4b 0000000c 01020304 a1b2c3d4'));
    const k32 = Buffer.alloc(32, 0x5a);
    assert.deepEqual(backendKeyData(7, k32), Buffer.concat([hex('4b 00000028 00000007'), k32]));
    const k256 = Buffer.alloc(256, 0x11);
    assert.deepEqual(backendKeyData(7, k256), msg('K', i32(7), k256));
  });

  test('NegotiateProtocolVersion', () => {
    assert.deepEqual(negotiateProtocolVersion(0, []), hex('76 0000000c 00030000 00000000'));
    assert.deepEqual(
      negotiateProtocolVersion(2, ['_pq_.a', '_pq_.bb']),
      Buffer.concat([hex('76'), i32(4 + 4 + 4 + 7 + 8), hex('00030002 00000002'), cstr('_pq_.a'), cstr('_pq_.bb')]),
    );
  });

  test('ErrorResponse and NoticeResponse fields S/V/C/M(/D/H)', () => {
    const e = errorResponse({ severity: 'FATAL', code: '08P01', message: 'boom' });
    assert.deepEqual(
      e,
      Buffer.concat([hex('45'), i32(4 + 7 + 7 + 7 + 6 + 1), hex('53'), cstr('FATAL'), hex('56'), cstr('FATAL'), hex('43'), cstr('08P01'), hex('4d'), cstr('boom'), hex('00')]),
    );
    const withDetail = errorResponse(new PgError('54000', 'too big', 'ERROR', 'the detail', 'a hint'));
    assert.deepEqual(
      withDetail,
      msg('E', hex('53'), cstr('ERROR'), hex('56'), cstr('ERROR'), hex('43'), cstr('54000'), hex('4d'), cstr('too big'), hex('44'), cstr('the detail'), hex('48'), cstr('a hint'), hex('00')),
    );
    const n = noticeResponse({ severity: 'WARNING', code: '01000', message: 'careful' });
    assert.equal(n[0], 0x4e);
    assert.deepEqual(n.subarray(1 + 4), Buffer.concat([hex('53'), cstr('WARNING'), hex('56'), cstr('WARNING'), hex('43'), cstr('01000'), hex('4d'), cstr('careful'), hex('00')]));
    // Round trip through the decoders.
    const f = decodeNoticeFields(withDetail, 0, withDetail.length);
    assert.deepEqual(Object.fromEntries(f), { S: 'ERROR', V: 'ERROR', C: '54000', M: 'too big', D: 'the detail', H: 'a hint' });
    assert.deepEqual(decodeError(e, 0, e.length), { severity: 'FATAL', code: '08P01', message: 'boom', detail: undefined });
    // Long messages grow the writer.
    const long = 'm'.repeat(1000);
    const el = errorResponse({ severity: 'ERROR', code: 'XX000', message: long });
    assert.equal(el.readInt32BE(1), el.length - 1);
    assert.equal(decodeError(el, 0, el.length).message, long);
  });

  test('small fixed messages', () => {
    assert.deepEqual(parseComplete(), hex('31 00000004'));
    assert.deepEqual(closeComplete(), hex('33 00000004'));
    assert.deepEqual(emptyQueryResponse(), hex('49 00000004'));
    assert.deepEqual(commandComplete('SELECT 1'), Buffer.concat([hex('43 0000000d'), cstr('SELECT 1')]));
  });

  test('RowDescription and DataRow', () => {
    assert.deepEqual(
      rowDescription(['a']),
      Buffer.concat([hex('54'), i32(4 + 2 + 2 + 18), i16(1), cstr('a'), i32(0), i16(0), i32(25), i16(-1), i32(-1), i16(0)]),
    );
    assert.deepEqual(dataRow(['ab', null, '']), Buffer.concat([hex('44'), i32(4 + 2 + 6 + 4 + 4), i16(3), i32(2), Buffer.from('ab'), i32(-1), i32(0)]));
    const many = dataRow(Array.from({ length: 50 }, (_, i) => `value-${i}`));
    assert.equal(many.readInt32BE(1), many.length - 1);
  });

  test('backend decoders on embedded messages', () => {
    const ps = embedded(parameterStatus('TimeZone', 'UTC'));
    assert.deepEqual(decodeParameterStatus(ps.buf, ps.start, ps.end), ['TimeZone', 'UTC']);
    const broken = embedded(msg('S', Buffer.from('TimeZone')));
    assert.deepEqual(decodeParameterStatus(broken.buf, broken.start, broken.end), ['', '']);
    const cc = embedded(commandComplete('INSERT 0 5'));
    assert.equal(decodeCommandTag(cc.buf, cc.start, cc.end), 'INSERT 0 5');
    const partial = embedded(msg('E', hex('53'), Buffer.from('FATAL')));
    assert.deepEqual(decodeError(partial.buf, partial.start, partial.end), { severity: 'ERROR', code: 'XX000', message: 'unknown error', detail: undefined });
  });
});

// ------------------------------------------------------------------ frontend encoders

describe('frontend encoders (exact bytes)', () => {
  test('Query, Sync, Terminate, password family', () => {
    assert.deepEqual(queryMessage('select 1'), Buffer.concat([hex('51 0000000d'), cstr('select 1')]));
    assert.deepEqual(queryMessage('ü'), Buffer.concat([hex('51 00000007'), cstr('ü')]));
    assert.deepEqual(syncMessage(), hex('53 00000004'));
    assert.deepEqual(terminateMessage(), hex('58 00000004'));
    assert.deepEqual(passwordMessage('md5abc'), Buffer.concat([hex('70 0000000b'), cstr('md5abc')]));
    assert.deepEqual(saslInitialResponse('SCRAM-SHA-256', 'n,,n=,r=x'), msg('p', cstr('SCRAM-SHA-256'), i32(9), Buffer.from('n,,n=,r=x')));
    assert.deepEqual(saslResponse('c=biws,r=x,p=y'), msg('p', Buffer.from('c=biws,r=x,p=y')));
  });

  test('Describe and Close', () => {
    assert.deepEqual(describeMessage(0x53, 'tg_1'), Buffer.concat([hex('44 0000000a 53'), cstr('tg_1')]));
    assert.deepEqual(describeMessage(0x50, ''), hex('44 00000006 50 00'));
    assert.deepEqual(closeMessage(0x53, 's'), hex('43 00000007 53 7300'));
  });

  test('internal extended-protocol query', () => {
    const b = parseMessageForInternalQuery('select $1, $2', ['x', null]);
    const seen = pushAll(new MessageFramer(1 << 20), [b]);
    assert.deepEqual(
      seen.map((s) => String.fromCharCode(s.type)),
      ['P', 'B', 'E', 'S'],
    );
    assert.deepEqual(seen[0].bytes, msg('P', cstr(''), cstr('select $1, $2'), i16(0)));
    assert.deepEqual(seen[1].bytes, msg('B', cstr(''), cstr(''), i16(0), i16(2), i32(1), Buffer.from('x'), i32(-1), i16(0)));
    assert.deepEqual(seen[2].bytes, msg('E', cstr(''), i32(0)));
    assert.deepEqual(seen[3].bytes, hex('53 00000004'));
  });

  test('MessageWriter grows from a tiny initial size and can hold several messages', () => {
    const w = new MessageWriter(1);
    w.begin(0x51).cstring('a'.repeat(1000)).end();
    w.begin(0x53).end();
    w.begin(-1).int32(196608).int8(0).end();
    const out = w.toBuffer();
    assert.equal(out.length, 1 + 4 + 1001 + 5 + 9);
    assert.equal(out.readInt32BE(1), 1005);
    assert.deepEqual(out.subarray(1006, 1011), hex('53 00000004'));
    assert.deepEqual(out.subarray(1011), hex('00000009 00030000 00'));
  });
});

// ------------------------------------------------------------------ frontend decoders

describe('frontend decoders', () => {
  test('readCString', () => {
    const b = Buffer.concat([Buffer.from('xx'), cstr('abc'), cstr('')]);
    assert.deepEqual(readCString(b, 2, b.length), ['abc', 6]);
    assert.deepEqual(readCString(b, 6, b.length), ['', 7]);
    assertMalformed(() => readCString(b, 2, 4), /unterminated/);
    assertMalformed(() => readCString(Buffer.from('abc'), 0, 3), /unterminated/);
  });

  test('Query', () => {
    const q = embedded(queryMessage('select 1'));
    assert.equal(decodeQuery(q.buf, q.start, q.end), 'select 1');
    const trailing = embedded(msg('Q', cstr('select 1'), Buffer.from('x')));
    assertMalformed(() => decodeQuery(trailing.buf, trailing.start, trailing.end), /trailing/);
    // The NUL found after the message end must not count.
    const unterminated = embedded(msg('Q', Buffer.from('select 1')), 3, 3);
    unterminated.buf.fill(0, unterminated.end);
    assertMalformed(() => decodeQuery(unterminated.buf, unterminated.start, unterminated.end), /unterminated/);
  });

  test('Parse with parameter types', () => {
    const m = msg('P', cstr('stmt1'), cstr('select $1::int, $2, $3'), i16(3), i32(23), i32(25), i32(0));
    const e = embedded(m);
    const p = decodeParse(e.buf, e.start, e.end);
    assert.equal(p.name, 'stmt1');
    assert.equal(p.query, 'select $1::int, $2, $3');
    assert.equal(p.queryStart, e.start + 5 + 6);
    assert.equal(p.typesStart, e.start + 5 + 6 + 23);
    assert.equal(e.buf.readInt16BE(p.typesStart), 3);
    assert.deepEqual(
      [0, 1, 2].map((i) => e.buf.readInt32BE(p.typesStart + 2 + i * 4)),
      [23, 25, 0],
    );
    const none = embedded(msg('P', cstr(''), cstr('select 1'), i16(0)));
    assert.deepEqual(decodeParse(none.buf, none.start, none.end), { name: '', query: 'select 1', queryStart: none.start + 6, typesStart: none.end - 2 });
  });

  test('malformed Parse', () => {
    const cases: [Buffer, RegExp][] = [
      [msg('P', Buffer.from('stmt')), /unterminated/],
      [msg('P', cstr('s'), Buffer.from('select 1')), /unterminated/],
      [msg('P', cstr('s'), cstr('select 1')), /parameter count/],
      [msg('P', cstr('s'), cstr('select 1'), hex('00')), /parameter count/],
      [msg('P', cstr('s'), cstr('select 1'), i16(-1)), /parameter types/],
      [msg('P', cstr('s'), cstr('select 1'), i16(2), i32(23)), /parameter types/],
      [msg('P', cstr('s'), cstr('select 1'), i16(1), i32(23), hex('00')), /parameter types/],
      [msg('P', cstr('s'), cstr('select 1'), i16(0), hex('00')), /parameter types/],
    ];
    for (const [m, re] of cases) {
      const e = embedded(m);
      e.buf.fill(0, e.end); // zero bytes after the end must not be read as terminators
      assertMalformed(() => decodeParse(e.buf, e.start, e.end), re);
    }
  });

  test('Bind names', () => {
    const rest = Buffer.concat([i16(1), i16(1), i16(2), i32(4), i32(42), i32(-1), i16(0)]);
    const m = msg('B', cstr('portal'), cstr('stmt'), rest);
    const e = embedded(m);
    const n = decodeBindNames(e.buf, e.start, e.end);
    assert.equal(n.portal, 'portal');
    assert.equal(n.statement, 'stmt');
    assert.equal(n.portalStart, e.start + 5);
    assert.equal(n.statementStart, e.start + 5 + 7);
    assert.equal(n.restStart, e.start + 5 + 7 + 5);
    assert.deepEqual(e.buf.subarray(n.restStart, e.end), rest);
    const unnamed = embedded(msg('B', cstr(''), cstr(''), i16(0), i16(0), i16(0)));
    assert.deepEqual(decodeBindNames(unnamed.buf, unnamed.start, unnamed.end), {
      portal: '',
      statement: '',
      portalStart: unnamed.start + 5,
      statementStart: unnamed.start + 6,
      restStart: unnamed.start + 7,
    });
    const bad = embedded(msg('B', cstr('p'), Buffer.from('stmt')));
    bad.buf.fill(0, bad.end);
    assertMalformed(() => decodeBindNames(bad.buf, bad.start, bad.end), /unterminated/);
    const bad2 = embedded(msg('B', Buffer.from('p')));
    assertMalformed(() => decodeBindNames(bad2.buf, bad2.start, bad2.end), /unterminated/);
  });

  test('Describe/Close target validation', () => {
    for (const type of ['D', 'C']) {
      const s = embedded(msg(type, Buffer.from('S'), cstr('stmt')));
      assert.deepEqual(decodeTarget(s.buf, s.start, s.end), { kind: 0x53, name: 'stmt' });
      const p = embedded(msg(type, Buffer.from('P'), cstr('')));
      assert.deepEqual(decodeTarget(p.buf, p.start, p.end), { kind: 0x50, name: '' });
      const x = embedded(msg(type, Buffer.from('X'), cstr('stmt')));
      assertMalformed(() => decodeTarget(x.buf, x.start, x.end), /target 'X'/);
      const short = embedded(msg(type, Buffer.from('S')));
      assertMalformed(() => decodeTarget(short.buf, short.start, short.end), /too short/);
      const empty = embedded(msg(type));
      assertMalformed(() => decodeTarget(empty.buf, empty.start, empty.end), /too short/);
      const trailing = embedded(msg(type, Buffer.from('S'), cstr('a'), Buffer.from('b')));
      assertMalformed(() => decodeTarget(trailing.buf, trailing.start, trailing.end), /trailing|unterminated/);
      const unterminated = embedded(msg(type, Buffer.from('S'), Buffer.from('abc')));
      unterminated.buf.fill(0, unterminated.end);
      assertMalformed(() => decodeTarget(unterminated.buf, unterminated.start, unterminated.end), /unterminated/);
    }
  });

  test('SASLInitialResponse incl. -1 length', () => {
    const data = Buffer.from('n,,n=,r=abc');
    const m = embedded(saslInitialResponse('SCRAM-SHA-256', data.toString()));
    const d = decodeSASLInitialResponse(m.buf, m.start, m.end);
    assert.equal(d.mechanism, 'SCRAM-SHA-256');
    assert.deepEqual(d.data, data);
    const none = embedded(msg('p', cstr('SCRAM-SHA-256'), i32(-1)));
    assert.deepEqual(decodeSASLInitialResponse(none.buf, none.start, none.end), { mechanism: 'SCRAM-SHA-256', data: null });
    const zero = embedded(msg('p', cstr('SCRAM-SHA-256'), i32(0)));
    assert.deepEqual(decodeSASLInitialResponse(zero.buf, zero.start, zero.end).data, Buffer.alloc(0));
    const bad: [Buffer, RegExp][] = [
      [msg('p', cstr('SCRAM-SHA-256')), /missing length/],
      [msg('p', cstr('SCRAM-SHA-256'), hex('000000')), /missing length/],
      [msg('p', cstr('SCRAM-SHA-256'), i32(-2)), /bad data length/],
      [msg('p', cstr('SCRAM-SHA-256'), i32(5), Buffer.from('abc')), /bad data length/],
      [msg('p', cstr('SCRAM-SHA-256'), i32(1), Buffer.from('abc')), /bad data length/],
      [msg('p', Buffer.from('SCRAM')), /unterminated/],
    ];
    for (const [b, re] of bad) {
      const e = embedded(b);
      e.buf.fill(0, e.end);
      assertMalformed(() => decodeSASLInitialResponse(e.buf, e.start, e.end), re);
    }
  });

  test('password message', () => {
    const p = embedded(passwordMessage('secret'));
    assert.equal(decodePassword(p.buf, p.start, p.end), 'secret');
    const t = embedded(msg('p', cstr('a'), Buffer.from('b')));
    assertMalformed(() => decodePassword(t.buf, t.start, t.end), /trailing/);
  });
});

// ------------------------------------------------------------------ rewrites

describe('statement-name rewrites keep every other byte identical', () => {
  function checkParse(name: Buffer, query: Buffer, types: number[], newName: string): void {
    const m = msg('P', cstr(name), cstr(query), i16(types.length), ...types.map(i32));
    const e = embedded(m, 11, 13);
    const parsed = decodeParse(e.buf, e.start, e.end);
    const out = rewriteParse(e.buf, e.start, e.end, parsed, newName);
    // Framing: one whole Parse message.
    assert.equal(out[0], 0x50);
    assert.equal(out.readInt32BE(1), out.length - 1);
    const d = decodeParse(out, 0, out.length);
    assert.equal(d.name, newName);
    assert.equal(d.query, parsed.query);
    // Everything after the name (query bytes, NUL, count, types) is byte-identical.
    const oldRest = e.buf.subarray(e.start + 5 + name.length + 1, e.end);
    const newRest = out.subarray(5 + Buffer.byteLength(newName) + 1);
    assert.deepEqual(newRest, oldRest);
    assert.deepEqual(out, msg('P', cstr(newName), oldRest));
  }

  function checkBind(portal: Buffer, statement: Buffer, rest: Buffer, newStatement: string): void {
    const m = msg('B', cstr(portal), cstr(statement), rest);
    const e = embedded(m, 3, 9);
    const names = decodeBindNames(e.buf, e.start, e.end);
    const out = rewriteBind(e.buf, e.end, names, newStatement);
    assert.equal(out[0], 0x42);
    assert.equal(out.readInt32BE(1), out.length - 1);
    const d = decodeBindNames(out, 0, out.length);
    assert.equal(d.portal, names.portal);
    assert.equal(d.statement, newStatement);
    assert.deepEqual(out.subarray(d.restStart), rest);
    // The portal name's bytes are copied as they were.
    assert.deepEqual(out, msg('B', cstr(portal), cstr(newStatement), rest));
  }

  test('Parse: name replaced, query and parameter types unchanged', () => {
    checkParse(Buffer.from('client_stmt'), Buffer.from('select $1::int + $2'), [23, 25], 'tg_0123456789abcdef0123456789ab');
    checkParse(Buffer.from('s'), Buffer.from('select 1'), [], 'a_much_longer_server_side_statement_name_than_before');
    checkParse(Buffer.from('a_long_client_statement_name'), Buffer.from(''), [0], 's');
    checkParse(Buffer.from('ünï'), Buffer.from("select 'ä€𝄞'"), [1043, 0, 0, 0], 'tg_x');
    checkParse(Buffer.from('big'), Buffer.from('select ' + 'x'.repeat(5000)), Array.from({ length: 100 }, (_, i) => i), 'tg_big');
  });

  test('Parse: query bytes that are not valid UTF-8 (e.g. client_encoding LATIN1) are kept exactly', () => {
    // 'é' and 'è' in LATIN1.
    checkParse(Buffer.from('s1'), Buffer.from([0x73, 0x65, 0x6c, 0x65, 0x63, 0x74, 0x20, 0x27, 0xe9, 0x27]), [], 'tg_1');
    checkParse(Buffer.from('s2'), Buffer.from([0xff, 0xfe, 0xe8, 0x20, 0xc3]), [25], 'tg_2');
  });

  test('Bind: statement replaced, portal and everything after unchanged', () => {
    const rest = Buffer.concat([i16(2), i16(0), i16(1), i16(3), i32(2), Buffer.from('42'), i32(-1), i32(4), hex('00000001'), i16(1), i16(1)]);
    checkBind(Buffer.from(''), Buffer.from('stmt'), rest, 'tg_abc');
    checkBind(Buffer.from('portal_1'), Buffer.from('s'), rest, 'tg_a_much_longer_name_0123456789012345678901234567890');
    checkBind(Buffer.from('pörtal'), Buffer.from('x'), Buffer.alloc(0), 'tg_y');
    checkBind(Buffer.from('p'), Buffer.from('x'), Buffer.alloc(3000, 7), 'tg_z');
  });

  test('Bind: a portal name that is not valid UTF-8 is kept exactly', () => {
    checkBind(Buffer.from([0x70, 0xe9]), Buffer.from('s'), Buffer.concat([i16(0), i16(0), i16(0)]), 'tg_1');
  });

  test('rewrites on random names, queries and bodies (property)', () => {
    const noNul = fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a.map((b) => (b === 0 ? 1 : b))));
    const ascii = fc.stringMatching(/^[A-Za-z0-9_]{0,63}$/);
    fc.assert(
      fc.property(noNul, noNul, fc.array(fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }), { maxLength: 20 }), ascii, (name, query, types, newName) => {
        checkParse(name, query, types, newName);
      }),
      { numRuns: 300, seed: 77 },
    );
    fc.assert(
      fc.property(noNul, noNul, fc.uint8Array({ maxLength: 200 }), ascii, (portal, statement, rest, newName) => {
        checkBind(portal, statement, Buffer.from(rest), newName);
      }),
      { numRuns: 300, seed: 78 },
    );
  });
});
