/**
 * Bounded property-based fuzzing of a running gateway (transaction mode) with fast-check:
 *   (a) random bytes as the very first packet,
 *   (b) a valid StartupMessage followed by random bytes / mangled SASL messages,
 *   (c) after a real SCRAM login over a raw socket, sequences of valid frontend messages, as they
 *       are (then the session must still answer a query) or mutated (truncations, bit flips,
 *       random lengths and types, inserted bytes).
 * Every few runs and at the end a normal node-postgres client must be served correctly, no
 * exception may escape in the process, the gateway must never answer with an internal error, and
 * at the end no client session or server connection may be left behind.
 *
 * The seed is fixed (override with FUZZ_SEED=…); on failure fast-check reports seed and path.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import pg from 'pg';
import { startStack, USERS, type Stack } from './helpers/stack.js';
import { RawConnection, rawLogin, errorFields, type BackendMessage } from './helpers/raw-client.js';
import { saslInitialResponse, startupMessage } from '../src/protocol/frontend.js';
import { cstr, i16, i32, msg, packet } from './helpers/bytes.js';

const SEED = Number(process.env.FUZZ_SEED ?? 0x7a5e);
/** FUZZ_SCALE=4 runs four times as many cases (for a deeper local run; the default fits CI). */
const SCALE = Math.max(0.1, Number(process.env.FUZZ_SCALE ?? 1));
const RUNS = { firstPacket: Math.ceil(150 * SCALE), afterStartup: Math.ceil(120 * SCALE), afterLogin: Math.ceil(200 * SCALE) };
const CHECK_EVERY = 25;
const POOL_SIZE = 3;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ arbitraries

const bytes = (maxLength: number) => fc.uint8Array({ maxLength }).map((a) => Buffer.from(a));

/** Splits a buffer at random points (the gateway must not care how bytes arrive). */
const cuts = fc.array(fc.nat({ max: 1 << 16 }), { maxLength: 4 });
function chunk(buf: Buffer, points: number[]): Buffer[] {
  const ps = [...new Set(points.map((p) => p % (buf.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of ps) {
    if (p > prev) out.push(buf.subarray(prev, p));
    prev = p;
  }
  if (prev < buf.length) out.push(buf.subarray(prev));
  return out;
}

/** (a) What a client might send first: pure noise, or packets with a plausible length and code. */
const firstPacket = fc.oneof(
  bytes(300),
  fc
    .tuple(fc.constantFrom(80877103, 80877104, 80877102, 196608, 196610, 131072, 0), bytes(120))
    .map(([code, body]) => packet(i32(code), body)),
  fc.tuple(fc.integer({ min: -10, max: 20_000 }), bytes(64)).map(([len, body]) => Buffer.concat([i32(len), body])),
  fc
    .array(fc.tuple(fc.constantFrom('user', 'database', 'options', '_pq_.x', 'application_name', 'replication'), fc.string({ maxLength: 12 })), { maxLength: 4 })
    .chain((params) => fc.tuple(fc.constant(params), fc.boolean()))
    .map(([params, terminated]) => packet(i32(196608), ...params.flatMap(([k, v]) => [cstr(k), cstr(v)]), terminated ? Buffer.from([0]) : Buffer.alloc(0))),
);

/** (b) After a valid StartupMessage for app: what the gateway waiting for the SASL response gets. */
const afterStartup = fc.oneof(
  bytes(200),
  bytes(120).map((b) => msg('p', b)),
  fc.tuple(fc.constantFrom('SCRAM-SHA-256', 'SCRAM-SHA-256-PLUS', '', 'PLAIN'), bytes(80)).map(([mech, data]) => msg('p', cstr(mech), i32(data.length), data)),
  fc.tuple(bytes(80), fc.integer({ min: -3, max: 100 })).map(([data, n]) => msg('p', cstr('SCRAM-SHA-256'), i32(n), data)),
  fc
    .tuple(fc.string({ maxLength: 40 }), bytes(80))
    .map(([first, second]) => Buffer.concat([saslInitialResponse('SCRAM-SHA-256', first), msg('p', second)])),
  fc.tuple(fc.integer({ min: 0, max: 255 }), bytes(60)).map(([t, b]) => msg(t, b)),
);

// (c) Valid frontend messages after login.
const stmtName = fc.constantFrom('', 's1', 's2');
const portalName = fc.constantFrom('', 'p1');
const sql = fc.constantFrom(
  'select 1',
  'select $1::int',
  'select $1::text, $2::int',
  'begin',
  'commit',
  'rollback',
  'select pg_sleep(0.01)',
  'insert into fuzz_t values (1, $1)',
  'copy fuzz_t from stdin',
  'copy (select 1, 2) to stdout',
  "set application_name = 'fz'",
  'select 1/0',
  'listen fz',
  'prepare q as select 1',
  'execute q',
  'declare c cursor for select 1',
  'fetch c',
  'select * from generate_series(1, 50)',
  '',
  ';',
  'select 1; select 2',
);
const param = fc.oneof(fc.constant(null), fc.constantFrom('1', '42', 'abc', ''), bytes(8));

const frontendMessage: fc.Arbitrary<Buffer> = fc.oneof(
  { weight: 3, arbitrary: sql.map((q) => msg('Q', cstr(q))) },
  {
    weight: 3,
    arbitrary: fc
      .tuple(stmtName, sql, fc.array(fc.constantFrom(0, 23, 25), { maxLength: 2 }))
      .map(([n, q, types]) => msg('P', cstr(n), cstr(q), i16(types.length), ...types.map(i32))),
  },
  {
    weight: 3,
    arbitrary: fc
      .tuple(portalName, stmtName, fc.array(fc.constantFrom(0, 1), { maxLength: 2 }), fc.array(param, { maxLength: 3 }), fc.array(fc.constantFrom(0, 1), { maxLength: 2 }))
      .map(([portal, stmt, formats, params, results]) =>
        msg(
          'B',
          cstr(portal),
          cstr(stmt),
          i16(formats.length),
          ...formats.map(i16),
          i16(params.length),
          ...params.map((p) => (p === null ? i32(-1) : Buffer.concat([i32(Buffer.byteLength(p)), Buffer.from(p)]))),
          i16(results.length),
          ...results.map(i16),
        ),
      ),
  },
  { weight: 2, arbitrary: fc.tuple(fc.constantFrom('S', 'P'), fc.oneof(stmtName, portalName)).map(([k, n]) => msg('D', Buffer.from(k), cstr(n))) },
  { weight: 3, arbitrary: fc.tuple(portalName, fc.integer({ min: 0, max: 3 })).map(([p, n]) => msg('E', cstr(p), i32(n))) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom('S', 'P'), fc.oneof(stmtName, portalName)).map(([k, n]) => msg('C', Buffer.from(k), cstr(n))) },
  { weight: 3, arbitrary: fc.constant(msg('S')) },
  { weight: 1, arbitrary: fc.constant(msg('H')) },
  { weight: 1, arbitrary: fc.constantFrom('1\tx\n', '2\ty\n', 'garbage\n', '\\.\n').map((d) => msg('d', Buffer.from(d))) },
  { weight: 1, arbitrary: fc.constant(msg('c')) },
  { weight: 1, arbitrary: fc.constant(msg('f', cstr('fuzz says no'))) },
  { weight: 1, arbitrary: fc.constant(msg('F', i32(0), i16(0), i16(0), i16(0))) },
);

type Mutation =
  | { kind: 'truncate'; at: number }
  | { kind: 'flip'; at: number; mask: number }
  | { kind: 'length'; message: number; value: number }
  | { kind: 'insert'; at: number; data: Buffer }
  | { kind: 'type'; message: number; type: number }
  | { kind: 'append'; data: Buffer };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), mask: fc.integer({ min: 1, max: 255 }) }),
  fc.record({
    kind: fc.constant('length' as const),
    message: fc.nat(),
    value: fc.oneof(fc.integer({ min: -5, max: 40 }), fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 })),
  }),
  fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), data: bytes(16) }),
  fc.record({ kind: fc.constant('type' as const), message: fc.nat(), type: fc.integer({ min: 0, max: 255 }) }),
  fc.record({
    kind: fc.constant('append' as const),
    data: fc.oneof(bytes(40), fc.tuple(fc.integer({ min: 0, max: 255 }), bytes(30)).map(([t, b]) => msg(t, b)), fc.constant(msg('X'))),
  }),
);

/** Applies mutations to the concatenation of `messages`; message-level ones address a message start. */
function mutate(messages: Buffer[], mutations: Mutation[]): Buffer {
  const starts: number[] = [];
  let pos = 0;
  for (const m of messages) {
    starts.push(pos);
    pos += m.length;
  }
  let buf = Buffer.from(Buffer.concat(messages));
  for (const m of mutations) {
    switch (m.kind) {
      case 'truncate':
        buf = buf.subarray(0, m.at % (buf.length + 1));
        break;
      case 'flip':
        if (buf.length > 0) buf[m.at % buf.length] ^= m.mask;
        break;
      case 'length': {
        const s = starts[m.message % starts.length];
        if (s !== undefined && s + 5 <= buf.length) buf.writeInt32BE(m.value, s + 1);
        break;
      }
      case 'type': {
        const s = starts[m.message % starts.length];
        if (s !== undefined && s < buf.length) buf[s] = m.type;
        break;
      }
      case 'insert': {
        const at = m.at % (buf.length + 1);
        buf = Buffer.concat([buf.subarray(0, at), m.data, buf.subarray(at)]);
        break;
      }
      case 'append':
        buf = Buffer.concat([buf, m.data]);
        break;
    }
  }
  return buf;
}

const session = fc.record({
  messages: fc.array(frontendMessage, { minLength: 1, maxLength: 12 }),
  mutations: fc.oneof({ weight: 1, arbitrary: fc.constant([] as Mutation[]) }, { weight: 2, arbitrary: fc.array(mutation, { minLength: 1, maxLength: 3 }) }),
  cuts,
});

// ------------------------------------------------------------------ the property runs

describe('fuzzing the gateway', () => {
  let stack: Stack;
  const uncaught: unknown[] = [];
  const onUncaught = (err: unknown) => uncaught.push(err);
  /** Internal errors the gateway sent to a fuzzing client (must never happen). */
  const internalErrors: string[] = [];
  let runs = 0;

  before(async () => {
    process.on('uncaughtException', onUncaught);
    process.on('unhandledRejection', onUncaught);
    stack = await startStack({
      pool: { mode: 'transaction', default_size: POOL_SIZE, wait_timeout_ms: 5000 },
      // Generous: logins borrow a server connection, which can take a while on a loaded machine.
      limits: { max_message_bytes: 1 << 20, startup_timeout_ms: 15_000 },
    });
    await stack.pg.query('create table fuzz_t (a int, b text)');
    await stack.pg.query('grant all on fuzz_t to app');
    console.log(`fuzz seed ${SEED} (set FUZZ_SEED to reproduce another), runs ${JSON.stringify(RUNS)}`);
  });
  after(async () => {
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
    await stack?.stop();
  });

  function noteReplies(conn: RawConnection, input: Buffer): void {
    // Raw bytes: after an 'N' answer to an SSLRequest the rest does not frame from the start.
    // Only the gateway's own internal errors count: PostgreSQL may say XX000 to random input
    // (e.g. "cache lookup failed for type" for a random parameter type OID).
    const all = Buffer.concat(conn.received);
    const at = all.indexOf('CXX000\0Minternal error');
    if (at >= 0) internalErrors.push(`${all.subarray(at, at + 200).toString()} after input ${input.toString('hex').slice(0, 400)}`);
  }

  async function send(conn: RawConnection, chunks: Buffer[]): Promise<void> {
    for (const c of chunks) {
      conn.write(c);
      await new Promise((r) => setImmediate(r));
    }
  }

  /** Waits until the gateway closed the connection or has been quiet for `quietMs`. */
  async function quiet(conn: RawConnection, quietMs: number, maxMs: number): Promise<void> {
    const deadline = Date.now() + maxMs;
    let seen = -1;
    while (!conn.closed && Date.now() < deadline) {
      if (conn.messages.length === seen) return;
      seen = conn.messages.length;
      await Promise.race([conn.closedPromise, sleep(quietMs)]);
    }
  }

  /** The things that must hold whatever the fuzzer did. */
  async function healthy(): Promise<void> {
    assert.deepEqual(uncaught, [], 'no uncaught exception or unhandled rejection');
    assert.deepEqual(internalErrors, [], 'the gateway never answers with an internal error');
    const failures = stack.logs.filter((l) => (l.level as number) >= 50);
    assert.deepEqual(failures, [], 'no error-level log lines');
    const c = new pg.Client(stack.clientConfig('app'));
    c.on('error', () => undefined);
    await c.connect();
    try {
      assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
      assert.equal((await c.query('select $1::int + 1 as n', [41])).rows[0].n, 42);
      assert.equal((await c.query({ name: 'fuzz_check', text: 'select $1::text as t', values: ['ok'] })).rows[0].t, 'ok');
      const state = await c.query('select txid_current_if_assigned() is null as no_xid, now() = statement_timestamp() as fresh');
      assert.deepEqual(state.rows[0], { no_xid: true, fresh: true });
    } finally {
      await c.end();
    }
  }

  /** Pools, sessions and the last log lines, for failure messages. */
  function gatewayState(): string {
    const pools = stack.gw.poolList().map((p) => ({ active: p.activeCount, idle: p.idleCount, waiting: p.waitingCount, connecting: p.connectingCount }));
    const lines = stack.logs.slice(-25).map((l) => `${l.conn ?? l.server ?? ''} ${l.msg} ${l.err ?? ''}`);
    return `clients=${stack.gw.clientCount} pools=${JSON.stringify(pools)} log:\n  ${lines.join('\n  ')}`;
  }

  async function afterRun(): Promise<void> {
    if (++runs % CHECK_EVERY === 0) await healthy();
  }

  const options = (numRuns: number): fc.Parameters<unknown> => ({ numRuns, seed: SEED, endOnFailure: true, verbose: 1 });

  test('(a) random bytes as the very first packet', async () => {
    await fc.assert(
      fc.asyncProperty(firstPacket, cuts, async (input, points) => {
        const conn = await RawConnection.connect(stack.port);
        try {
          await send(conn, chunk(input, points));
          await quiet(conn, 60, 300);
          noteReplies(conn, input);
        } finally {
          conn.destroy();
        }
        await afterRun();
      }),
      options(RUNS.firstPacket),
    );
    await healthy();
  });

  test('(b) a valid StartupMessage, then random bytes instead of the SASL response', async () => {
    const startup = startupMessage([
      ['user', 'app'],
      ['database', 'postgres'],
    ]);
    await fc.assert(
      fc.asyncProperty(afterStartup, cuts, fc.boolean(), async (input, points, together) => {
        const conn = await RawConnection.connect(stack.port);
        try {
          if (together) await send(conn, chunk(Buffer.concat([startup, input]), points));
          else {
            conn.write(startup);
            const first = await conn.next(3000);
            assert.equal(first.type, 'R', 'AuthenticationSASL');
            await send(conn, chunk(input, points));
          }
          await quiet(conn, 60, 300);
          noteReplies(conn, input);
          assert.equal(conn.framingError, null);
          // Random bytes never log anyone in.
          assert.ok(!conn.messages.some((m) => m.type === 'R' && m.bytes.readInt32BE(5) === 0), 'no AuthenticationOk');
        } finally {
          conn.destroy();
        }
        await afterRun();
      }),
      options(RUNS.afterStartup),
    );
    await healthy();
  });

  test('(c) after a real login: valid and mutated message sequences', async () => {
    await fc.assert(
      fc.asyncProperty(session, async ({ messages, mutations, cuts: points }) => {
        const conn = await rawLogin(stack.port, { user: 'app', password: USERS.app }).catch((err: Error) => {
          throw new Error(`login failed: ${err.message}; ${gatewayState()}`);
        });
        const input = mutate(messages, mutations);
        try {
          const loginMessages = conn.messages.length;
          await send(conn, chunk(input, points));
          await quiet(conn, 80, 1500);
          noteReplies(conn, input);
          assert.equal(conn.framingError, null, 'replies frame as protocol messages');
          if (mutations.length === 0) {
            // Valid messages only: however odd the sequence, the session must still work, unless
            // PostgreSQL itself gave up on it (e.g. "protocol synchronization was lost" after
            // other messages interrupted a COPY), which the gateway relays.
            if (!conn.closed) {
              conn.write(Buffer.concat([msg('f', cstr('fuzz recovery')), msg('S'), msg('Q', cstr('rollback; select 4242 as answer'))]));
              await expectAnswer(conn);
            }
            if (conn.closed) {
              const replies = conn.messages.slice(loginMessages);
              const serverFatal = replies.some((m) => m.type === 'E' && errorFields(m).V === 'FATAL' && errorFields(m).R !== undefined);
              assert.ok(serverFatal, `closed after valid messages without a FATAL from PostgreSQL: ${describe_(replies)}`);
            }
          }
        } finally {
          conn.destroy();
        }
        await afterRun();
      }),
      options(RUNS.afterLogin),
    );
    await healthy();
  });

  test('nothing is left behind', async () => {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const pools = stack.gw.poolList();
      const atRest = stack.gw.clientCount === 0 && pools.every((p) => p.activeCount === 0 && p.waitingCount === 0 && p.connectingCount === 0);
      if (atRest) break;
      if (Date.now() > deadline) {
        assert.fail(
          `not at rest: clients=${stack.gw.clientCount} pools=${JSON.stringify(pools.map((p) => ({ a: p.activeCount, i: p.idleCount, w: p.waitingCount, c: p.connectingCount })))}`,
        );
      }
      await sleep(50);
    }
    const backends = await stack.pg.query<{ n: number }>(
      `select count(*)::int as n from pg_stat_activity where usename = 'app' and backend_type = 'client backend'`,
    );
    assert.ok(backends[0].n <= POOL_SIZE, `at most ${POOL_SIZE} server connections (got ${backends[0].n})`);
    await healthy();
  });
});

function describe_(messages: BackendMessage[]): string {
  return messages.map((m) => (m.type === 'E' ? `E${JSON.stringify(errorFields(m))}` : m.type)).join(' ');
}

/**
 * Reads until the DataRow of `select 4242` and the ReadyForQuery after it. A connection closed on
 * the way is left for the caller to judge (PostgreSQL may have ended it).
 */
async function expectAnswer(conn: RawConnection): Promise<void> {
  const seen: BackendMessage[] = [];
  let answered = false;
  try {
    for (;;) {
      const m = await conn.next(5000);
      seen.push(m);
      if (m.type === 'D' && m.bytes.subarray(11).toString() === '4242') answered = true;
      if (answered && m.type === 'Z') return;
    }
  } catch (err) {
    if (conn.closed) return;
    assert.fail(`session did not answer after valid messages: ${(err as Error).message}; saw ${describe_(seen)}`);
  }
}
