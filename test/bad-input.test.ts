/**
 * Bad input against a running gateway (transaction mode): each case sends bytes no well-behaved
 * driver would over a raw socket and checks the reply (FATAL with the fitting SQLSTATE where a
 * reply is possible), that the socket is closed, and that everyone else is unaffected: a client
 * that was mid-transaction on another connection carries on, a new client works, and no server
 * connection is leaked or handed on in a dirty state.
 */
import { test, describe, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import pg from 'pg';
import { startStack, startGateway, stackOf, USERS, type Stack } from './helpers/stack.js';
import { RawConnection, rawLogin, errorFields, type BackendMessage } from './helpers/raw-client.js';
import { queryMessage, startupMessage, syncMessage, terminateMessage } from '../src/protocol/frontend.js';
import { cstr, i16, i32, msg, packet } from './helpers/bytes.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const STARTUP_TIMEOUT_MS = 500;
const MAX_MESSAGE_BYTES = 1 << 20;

// ------------------------------------------------------------------ byte builders

const V3 = i32(196608);

// ------------------------------------------------------------------ helpers

async function connect(stack: Stack, user = 'app'): Promise<pg.Client> {
  const c = new pg.Client(stack.clientConfig(user));
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function waitUntil(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) assert.fail(`timed out waiting until ${what}`);
    await sleep(20);
  }
}

function describeMessages(messages: BackendMessage[]): string {
  return messages.map((m) => (m.type === 'E' ? `E${JSON.stringify(errorFields(m))}` : m.type)).join(' ');
}

/** The gateway answers with one ErrorResponse of severity FATAL and `code`, then closes. */
async function expectFatal(conn: RawConnection, code: string, message?: RegExp, timeoutMs = 3000): Promise<Record<string, string>> {
  const { closed, messages } = await conn.drain(timeoutMs);
  const errors = messages.filter((m) => m.type === 'E');
  assert.equal(errors.length, 1, `expected one ErrorResponse, got: ${describeMessages(messages)}`);
  const f = errorFields(errors[0]);
  assert.equal(f.S, 'FATAL', describeMessages(messages));
  assert.equal(f.V, 'FATAL', describeMessages(messages));
  assert.equal(f.C, code, describeMessages(messages));
  if (message) assert.match(f.M, message);
  assert.equal(messages[messages.length - 1].type, 'E', `nothing after the FATAL error: ${describeMessages(messages)}`);
  assert.ok(closed, 'the gateway closed the connection');
  assert.equal(conn.framingError, null);
  return f;
}

/** Raw connections opened by a test, destroyed after it whatever happened. */
const opened: RawConnection[] = [];
afterEach(() => {
  for (const c of opened.splice(0)) c.destroy();
});

async function rawConnect(stack: Stack): Promise<RawConnection> {
  const conn = await RawConnection.connect(stack.port);
  opened.push(conn);
  return conn;
}

/** A raw connection that sent `bytes` before login. */
async function rawSend(stack: Stack, ...chunks: Buffer[]): Promise<RawConnection> {
  const conn = await rawConnect(stack);
  for (const c of chunks) conn.write(c);
  return conn;
}

async function login(stack: Stack, params?: Record<string, string>): Promise<RawConnection> {
  const conn = await rawLogin(stack.port, { user: 'app', password: USERS.app, params });
  opened.push(conn);
  return conn;
}

/** Every pool is back at rest: no client sessions, no linked server connections, nobody waiting. */
async function settled(stack: Stack, maxServers: number): Promise<void> {
  await waitUntil(
    'the gateway has no clients and every server connection is idle',
    () =>
      stack.gw.clientCount === 0 &&
      stack.gw.poolList().every((p) => p.activeCount === 0 && p.waitingCount === 0 && p.connectingCount === 0 && p.idleCount <= maxServers),
  );
  const backends = await stack.pg.query<{ n: number }>(
    `select count(*)::int as n from pg_stat_activity where usename = 'app' and backend_type = 'client backend'`,
  );
  assert.ok(backends[0].n <= maxServers, `at most ${maxServers} server connections for app (got ${backends[0].n})`);
}

/** A new node-postgres client works and gets a clean server connection. */
async function assertNormalClientWorks(stack: Stack): Promise<void> {
  const c = await connect(stack);
  try {
    // Simple protocol: inside a transaction left open by someone else, now() would be older.
    const r = await c.query('select 1 as one, txid_current_if_assigned() is null as no_xid, now() = statement_timestamp() as fresh');
    assert.deepEqual(r.rows[0], { one: 1, no_xid: true, fresh: true });
    const s = await c.query('select $1::text as echo', ['ok']);
    assert.equal(s.rows[0].echo, 'ok');
  } finally {
    await c.end();
  }
}

let caseCounter = 0;

/**
 * Runs `bad` while another client is inside a transaction, then checks that this client carries
 * on, that a new client works, and that the gateway is back at rest.
 */
async function isolatedCase(stack: Stack, maxServers: number, bad: () => Promise<void>): Promise<void> {
  const caseId = ++caseCounter;
  const holder = await connect(stack);
  try {
    await holder.query('begin');
    await holder.query('insert into bad_input_t values ($1)', [caseId]);
    await bad();
    const r = await holder.query('select count(*)::int as n, txid_current_if_assigned() is not null as in_tx from bad_input_t where case_id = $1', [caseId]);
    assert.deepEqual(r.rows[0], { n: 1, in_tx: true }, 'the other client is still in its transaction');
    await holder.query('commit');
  } finally {
    await holder.end();
  }
  await assertNormalClientWorks(stack);
  await settled(stack, maxServers);
}

// ------------------------------------------------------------------ the main stack: pool size 2

describe('bad input', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack({
      pool: { mode: 'transaction', default_size: 2, wait_timeout_ms: 5000 },
      limits: { max_message_bytes: MAX_MESSAGE_BYTES, startup_timeout_ms: STARTUP_TIMEOUT_MS },
    });
    await stack.pg.query('create table bad_input_t (case_id int)');
    await stack.pg.query('grant all on bad_input_t to app');
  });
  after(() => stack?.stop());

  const run = (bad: () => Promise<void>) => isolatedCase(stack, 2, bad);

  describe('startup phase', () => {
    test('invalid startup packet length 3', () =>
      run(async () => {
        const c = await rawSend(stack, i32(3), Buffer.from([0, 3, 0, 0]));
        await expectFatal(c, '08P01', /invalid length of startup packet/);
      }));

    test('invalid startup packet length 100000', () =>
      run(async () => {
        const c = await rawSend(stack, i32(100000), V3, cstr('user'), cstr('app'));
        await expectFatal(c, '08P01', /invalid length of startup packet/);
      }));

    test('negative startup packet length', () =>
      run(async () => {
        const c = await rawSend(stack, Buffer.from([0xff, 0xff, 0xff, 0xf0]));
        await expectFatal(c, '08P01', /invalid length of startup packet/);
      }));

    test('startup with protocol 2.0', () =>
      run(async () => {
        const c = await rawSend(stack, packet(i32(0x00020000), cstr('user'), cstr('app'), cstr('database'), cstr('postgres'), Buffer.from([0])));
        await expectFatal(c, '0A000', /unsupported frontend protocol 2\.0/);
      }));

    test('startup without terminator', () =>
      run(async () => {
        const c = await rawSend(stack, packet(V3, cstr('user'), cstr('app'), cstr('database'), cstr('postgres')));
        await expectFatal(c, '08P01', /not terminated/);
      }));

    test('startup with a parameter without value', () =>
      run(async () => {
        const c = await rawSend(stack, packet(V3, cstr('user'), cstr('app'), cstr('database')));
        await expectFatal(c, '08P01', /without value/);
      }));

    test('startup packet lacking user', () =>
      run(async () => {
        const c = await rawSend(stack, packet(V3, cstr('database'), cstr('postgres'), Buffer.from([0])));
        await expectFatal(c, '28000', /no PostgreSQL user name/);
      }));

    test('startup packet split into single bytes still works', () =>
      run(async () => {
        const c = await rawConnect(stack);
        for (const b of startupMessage([
          ['user', 'app'],
          ['database', 'postgres'],
        ]))
          c.write(Buffer.from([b]));
        const m = await c.next(3000);
        assert.equal(m.type, 'R');
        assert.equal(m.bytes.readInt32BE(5), 10, 'AuthenticationSASL');
        c.destroy();
      }));

    test('a client that connects and never sends a startup packet is timed out', () =>
      run(async () => {
        const t0 = Date.now();
        const c = await rawConnect(stack);
        await expectFatal(c, '08P01', /timeout/, STARTUP_TIMEOUT_MS + 3000);
        assert.ok(Date.now() - t0 >= STARTUP_TIMEOUT_MS - 50, 'not before the timeout');
      }));

    test('a client that sends half a startup packet and stalls is timed out', () =>
      run(async () => {
        const full = startupMessage([
          ['user', 'app'],
          ['database', 'postgres'],
        ]);
        const c = await rawSend(stack, full.subarray(0, 10));
        await expectFatal(c, '08P01', /timeout/, STARTUP_TIMEOUT_MS + 3000);
      }));

    test('a client that stalls during authentication is timed out', () =>
      run(async () => {
        const c = await rawSend(stack, startupMessage([['user', 'app']]));
        const m = await c.next(3000);
        assert.equal(m.type, 'R');
        await expectFatal(c, '08P01', /timeout/, STARTUP_TIMEOUT_MS + 3000);
      }));

    test('a non-password message instead of the SASL response', () =>
      run(async () => {
        const c = await rawSend(stack, startupMessage([['user', 'app']]));
        assert.equal((await c.next(3000)).type, 'R');
        c.write(queryMessage('select 1'));
        await expectFatal(c, '08P01', /expected password response/);
      }));

    test('a too-long message during authentication', () =>
      run(async () => {
        const c = await rawSend(stack, startupMessage([['user', 'app']]));
        assert.equal((await c.next(3000)).type, 'R');
        c.write(Buffer.concat([Buffer.from('p'), i32(2 * MAX_MESSAGE_BYTES)]));
        await expectFatal(c, '54000');
      }));
  });

  describe('after login', () => {
    test('unknown message type (Z from the client)', () =>
      run(async () => {
        const c = await login(stack);
        c.write(msg('Z', Buffer.from('I')));
        await expectFatal(c, '08P01', /invalid frontend message type "Z"/);
      }));

    test('unknown message type behind a valid query in the same chunk', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([queryMessage('select 1'), msg('\x01')]));
        await expectFatal(c, '08P01', /invalid frontend message type/);
      }));

    test('a message with length < 4', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([Buffer.from('Q'), i32(3), Buffer.from('x')]));
        await expectFatal(c, '08P01', /invalid message length/);
      }));

    test('a message whose length exceeds limits.max_message_bytes', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([Buffer.from('Q'), i32(2 * MAX_MESSAGE_BYTES), Buffer.from('select ')]));
        await expectFatal(c, '54000', /above the limit/);
      }));

    test('a message at limits.max_message_bytes is accepted', () =>
      run(async () => {
        const c = await login(stack);
        const prefix = "select length('";
        const suffix = "') as n";
        const sql = prefix + 'x'.repeat(MAX_MESSAGE_BYTES - 4 - 1 - prefix.length - suffix.length) + suffix;
        const m = msg('Q', cstr(sql));
        assert.equal(m.readInt32BE(1), MAX_MESSAGE_BYTES);
        c.write(m);
        const reply = await c.until('Z', 10_000);
        assert.deepEqual(
          reply.map((r) => r.type),
          ['T', 'D', 'C', 'Z'],
          describeMessages(reply),
        );
        c.write(terminateMessage());
        assert.ok(await c.waitClosed(3000));
      }));

    test('a truncated Parse (unterminated string)', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([msg('P', cstr('s1'), Buffer.from('select 1')), syncMessage()]));
        await expectFatal(c, '08P01', /unterminated string/);
      }));

    test('a Parse with a wrong parameter count', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([msg('P', cstr('s1'), cstr('select $1'), i16(3), i32(23)), syncMessage()]));
        await expectFatal(c, '08P01', /Parse/);
      }));

    test('a Query without terminator', () =>
      run(async () => {
        const c = await login(stack);
        c.write(msg('Q', Buffer.from('select 1')));
        await expectFatal(c, '08P01', /unterminated string/);
      }));

    test('a Bind referring to an unknown statement: ERROR 26000, then the connection keeps working', () =>
      run(async () => {
        const c = await login(stack);
        c.write(
          Buffer.concat([
            msg('B', cstr(''), cstr('no_such_statement'), i16(0), i16(0), i16(0)),
            msg('E', cstr(''), i32(0)),
            syncMessage(),
          ]),
        );
        const reply = await c.until('Z');
        assert.deepEqual(
          reply.map((m) => m.type),
          ['E', 'Z'],
          describeMessages(reply),
        );
        const f = errorFields(reply[0]);
        assert.equal(f.S, 'ERROR');
        assert.equal(f.C, '26000');
        assert.match(f.M, /no_such_statement/);
        assert.equal(reply[1].bytes[5], 0x49, 'ReadyForQuery idle');
        c.write(queryMessage('select 41 + 1'));
        const ok = await c.until('Z');
        assert.deepEqual(
          ok.map((m) => m.type),
          ['T', 'D', 'C', 'Z'],
        );
        assert.match(ok[1].bytes.toString(), /42/);
        c.write(terminateMessage());
        assert.ok(await c.waitClosed(3000));
      }));

    test('a Describe with target X', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([msg('D', Buffer.from('X'), cstr('')), syncMessage()]));
        await expectFatal(c, '08P01', /target 'X'/);
      }));

    test('a Close with target X inside a pipelined batch', () =>
      run(async () => {
        const c = await login(stack);
        c.write(Buffer.concat([msg('P', cstr(''), cstr('select 1'), i16(0)), msg('C', Buffer.from('X'), cstr('a')), syncMessage()]));
        await expectFatal(c, '08P01', /target 'X'/);
      }));

    test('a query pipelined right behind the SASL response is answered after login', () =>
      run(async () => {
        const c = await rawLogin(stack.port, { user: 'app', password: USERS.app, pipelined: queryMessage('select 7 as seven') });
        opened.push(c);
        const reply = await c.until('Z');
        assert.deepEqual(
          reply.map((m) => m.type),
          ['T', 'D', 'C', 'Z'],
          describeMessages(reply),
        );
        c.write(terminateMessage());
        assert.ok(await c.waitClosed(3000));
      }));

    test('a password message after login', () =>
      run(async () => {
        const c = await login(stack);
        c.write(msg('p', cstr('secret')));
        await expectFatal(c, '08P01', /password/);
      }));

    test('named statements with non-UTF-8 bytes (client_encoding LATIN1) keep their exact text', () =>
      run(async () => {
        const c = await login(stack, { client_encoding: 'LATIN1' });
        const latin1 = (s: string) => Buffer.from(s, 'latin1');
        const exec = (name: string) => Buffer.concat([msg('B', cstr(''), cstr(name), i16(0), i16(0), i16(0)), msg('E', cstr(''), i32(0))]);
        c.write(
          Buffer.concat([
            msg('P', cstr('s_e_acute'), cstr(latin1("select 'é' as v")), i16(0)),
            msg('P', cstr('s_e_grave'), cstr(latin1("select 'è' as v")), i16(0)),
            exec('s_e_acute'),
            exec('s_e_grave'),
            syncMessage(),
          ]),
        );
        const reply = await c.until('Z');
        assert.deepEqual(
          reply.map((m) => m.type),
          ['1', '1', '2', 'D', 'C', '2', 'D', 'C', 'Z'],
          describeMessages(reply),
        );
        const value = (d: BackendMessage) => d.bytes.subarray(11).toString('latin1');
        assert.equal(value(reply[3]), 'é');
        assert.equal(value(reply[6]), 'è');
        c.write(terminateMessage());
        assert.ok(await c.waitClosed(3000));
      }));
  });

  test('the admin console shows no leaked server connections', async () => {
    await settled(stack, 2);
    const admin = new pg.Client({ ...stack.clientConfig('app'), database: 'trustgate' });
    await admin.connect();
    try {
      const pools = await admin.query('SHOW POOLS');
      const row = pools.rows.find((r) => r.user === 'app' && r.database === 'postgres');
      assert.ok(row, JSON.stringify(pools.rows));
      assert.equal(Number(row.sv_active), 0);
      assert.equal(Number(row.cl_waiting), 0);
      assert.ok(Number(row.sv_idle) <= 2);
      const clients = await admin.query('SHOW CLIENTS');
      assert.equal(clients.rows.length, 1, 'only the console itself');
    } finally {
      await admin.end();
    }
  });
});

// ------------------------------------------------------------------ pool of one: nothing may leak

/** How many of app's `pg_sleep(5)` queries are running on the server. */
async function activeSleeps(stack: Stack): Promise<number> {
  const r = await stack.pg.query<{ n: number }>(
    `select count(*)::int as n from pg_stat_activity where usename = 'app' and query like '%pg_sleep(5)%' and state = 'active'`,
  );
  return r[0].n;
}

describe('abrupt disconnects with a pool of one server connection', () => {
  let base: Stack;
  let stack: Stack;
  const WAIT_TIMEOUT_MS = 3000;
  before(async () => {
    base = await startStack({ pool: { default_size: 1 } });
    await base.pg.query('create table bad_input_t (case_id int)');
    await base.pg.query('grant all on bad_input_t to app');
    const { gw, logs } = await startGateway(base.pg, {
      pool: { mode: 'transaction', default_size: 1, wait_timeout_ms: WAIT_TIMEOUT_MS },
      // Login borrows the server connection: let the pool's wait timeout be the bound here.
      limits: { max_message_bytes: MAX_MESSAGE_BYTES, startup_timeout_ms: 10_000 },
    });
    stack = stackOf(base.pg, gw, logs, false);
  });
  after(async () => {
    await stack?.gw.stop(1000);
    await base?.stop();
  });

  /** The next client is served within the wait timeout and gets a clean connection. */
  async function nextClientIsServed(): Promise<void> {
    const t0 = Date.now();
    await assertNormalClientWorks(stack);
    assert.ok(Date.now() - t0 < WAIT_TIMEOUT_MS, `served after ${Date.now() - t0} ms`);
    await settled(stack, 1);
  }

  test('disconnect in the middle of a long query', async () => {
    const c = await login(stack);
    c.write(queryMessage('select pg_sleep(5)'));
    await waitUntil('the query runs', async () => (await activeSleeps(stack)) === 1);
    c.destroy();
    await nextClientIsServed();
    await waitUntil('the abandoned query is no longer running', async () => (await activeSleeps(stack)) === 0, 2000);
  });

  test('disconnect in the middle of an extended-protocol query (no Sync yet)', async () => {
    const c = await login(stack);
    c.write(Buffer.concat([msg('P', cstr(''), cstr('select pg_sleep(5)'), i16(0)), msg('B', cstr(''), cstr(''), i16(0), i16(0), i16(0)), msg('E', cstr(''), i32(0)), msg('H')]));
    await waitUntil('the query runs', async () => (await activeSleeps(stack)) === 1);
    c.destroy();
    await nextClientIsServed();
    await waitUntil('the abandoned query is no longer running', async () => (await activeSleeps(stack)) === 0, 2000);
  });

  test('disconnect in the middle of an open transaction', async () => {
    const c = await login(stack);
    c.write(queryMessage('begin'));
    let reply = await c.until('Z');
    assert.equal(reply[reply.length - 1].bytes[5], 0x54, 'in transaction');
    c.write(queryMessage('insert into bad_input_t values (424242)'));
    reply = await c.until('Z');
    assert.equal(reply[reply.length - 1].bytes[5], 0x54, 'in transaction');
    c.destroy();
    await nextClientIsServed();
    const check = await connect(stack);
    try {
      const r = await check.query('select count(*)::int as n from bad_input_t where case_id = 424242');
      assert.equal(r.rows[0].n, 0, 'the abandoned transaction was rolled back');
    } finally {
      await check.end();
    }
    await settled(stack, 1);
  });

  test('disconnect in a failed transaction', async () => {
    const c = await login(stack);
    c.write(queryMessage('begin; select 1/0'));
    const reply = await c.until('Z');
    assert.equal(reply[reply.length - 1].bytes[5], 0x45, 'failed transaction');
    c.destroy();
    await nextClientIsServed();
  });

  test('an unknown message type is refused at once, even while no server connection is free', async () => {
    const c = await login(stack);
    const holder = await connect(stack);
    try {
      await holder.query('begin');
      await holder.query('select 1');
      const t0 = Date.now();
      c.write(msg('Z', Buffer.from('I')));
      await expectFatal(c, '08P01', /invalid frontend message type "Z"/, WAIT_TIMEOUT_MS + 2000);
      assert.ok(Date.now() - t0 < 1000, `refused after ${Date.now() - t0} ms`);
      await holder.query('commit');
    } finally {
      await holder.end();
    }
    await nextClientIsServed();
  });

  test('many abrupt disconnects in a row do not exhaust the pool', async () => {
    for (let i = 0; i < 5; i++) {
      const c = await login(stack);
      c.write(queryMessage(i % 2 ? 'begin; select pg_sleep(5)' : 'select pg_sleep(5)'));
      await waitUntil('the query runs', async () => (await activeSleeps(stack)) === 1);
      c.destroy();
    }
    await nextClientIsServed();
    await waitUntil('no abandoned query runs', async () => (await activeSleeps(stack)) === 0, 2000);
  });

  test('a socket closed by the peer before the gateway replies does not disturb others', async () => {
    const holder = await connect(stack);
    try {
      await holder.query('begin');
      for (let i = 0; i < 5; i++) {
        const s = net.connect({ port: stack.port, host: '127.0.0.1' });
        s.on('error', () => undefined);
        await new Promise<void>((r) => s.once('connect', () => r()));
        s.end(packet(V3, cstr('user')));
        s.destroy();
      }
      assert.equal((await holder.query('select 3 as three')).rows[0].three, 3);
      await holder.query('commit');
    } finally {
      await holder.end();
    }
    await nextClientIsServed();
  });
});

// ------------------------------------------------------------------ session mode: the same for a dedicated server

describe('abrupt disconnects in session mode (pool of one)', () => {
  let base: Stack;
  let stack: Stack;
  const WAIT_TIMEOUT_MS = 3000;
  before(async () => {
    base = await startStack({ pool: { default_size: 1 } });
    const { gw, logs } = await startGateway(base.pg, {
      pool: { mode: 'session', default_size: 1, wait_timeout_ms: WAIT_TIMEOUT_MS },
      limits: { startup_timeout_ms: 10_000 },
    });
    stack = stackOf(base.pg, gw, logs, false);
  });
  after(async () => {
    await stack?.gw.stop(1000);
    await base?.stop();
  });

  /** The next client gets the server back in time, clean, and in step (each reply is its own). */
  async function nextClientIsServed(): Promise<void> {
    const t0 = Date.now();
    const c = await connect(stack);
    try {
      assert.ok(Date.now() - t0 < WAIT_TIMEOUT_MS, `served after ${Date.now() - t0} ms`);
      for (let i = 1; i <= 5; i++) assert.equal((await c.query(`select ${i} as n`)).rows[0].n, i);
      const r = await c.query('select txid_current_if_assigned() is null as no_xid, now() = statement_timestamp() as fresh');
      assert.deepEqual(r.rows[0], { no_xid: true, fresh: true });
      assert.equal((await c.query('select $1::int as n', [7])).rows[0].n, 7);
    } finally {
      await c.end();
    }
    await waitUntil('the abandoned query is no longer running', async () => (await activeSleeps(stack)) === 0, 2000);
    await settled(stack, 1);
  }

  for (const [name, bytes] of [
    ['simple query', () => queryMessage('select pg_sleep(5)')],
    [
      'extended query',
      () =>
        Buffer.concat([
          msg('P', cstr(''), cstr('select pg_sleep(5)'), i16(0)),
          msg('B', cstr(''), cstr(''), i16(0), i16(0), i16(0)),
          msg('E', cstr(''), i32(0)),
          syncMessage(),
        ]),
    ],
  ] as const) {
    test(`disconnect in the middle of a long ${name}`, async () => {
      const c = await login(stack);
      c.write(bytes());
      await waitUntil('the query runs', async () => (await activeSleeps(stack)) === 1);
      c.destroy();
      await nextClientIsServed();
    });
  }

  test('disconnect in the middle of an open transaction', async () => {
    const c = await login(stack);
    c.write(queryMessage('begin'));
    const reply = await c.until('Z');
    assert.equal(reply[reply.length - 1].bytes[5], 0x54, 'in transaction');
    c.destroy();
    await nextClientIsServed();
  });
});
