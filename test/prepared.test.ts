/**
 * Protocol-level prepared statements in transaction mode, at the byte level: the gateway's books
 * (which statements exist for the client and on each server connection) must follow exactly what
 * PostgreSQL did, including when a request in a pipeline fails and the rest is skipped to Sync.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startStack, USERS, type Stack } from './helpers/stack.js';
import { rawLogin, errorFields, type RawConnection, type BackendMessage } from './helpers/raw-client.js';
import { MessageWriter } from '../src/protocol/writer.js';

const P = (name: string, sql: string) => new MessageWriter().begin(0x50).cstring(name).cstring(sql).int16(0).end().toBuffer();
const B = (stmt: string, params: string[] = []) => {
  const w = new MessageWriter().begin(0x42).cstring('').cstring(stmt).int16(0).int16(params.length);
  for (const p of params) w.int32(Buffer.byteLength(p)).bytes(Buffer.from(p));
  return w.int16(0).end().toBuffer();
};
const E = () => new MessageWriter().begin(0x45).cstring('').int32(0).end().toBuffer();
const D = (stmt: string) => new MessageWriter().begin(0x44).int8(0x53).cstring(stmt).end().toBuffer();
const C = (stmt: string) => new MessageWriter().begin(0x43).int8(0x53).cstring(stmt).end().toBuffer();
const S = () => new MessageWriter().begin(0x53).end().toBuffer();

/** Sends a batch ending in Sync and returns the reply types up to ReadyForQuery. */
async function batch(conn: RawConnection, ...messages: Buffer[]): Promise<BackendMessage[]> {
  conn.write(Buffer.concat(messages));
  return conn.until('Z');
}
const types = (ms: BackendMessage[]) => ms.map((m) => m.type).join('');
const codeOf = (ms: BackendMessage[]) => errorFields(ms.find((m) => m.type === 'E')!).C;
const firstValue = (ms: BackendMessage[]) => {
  const d = ms.find((m) => m.type === 'D')!;
  const len = d.bytes.readInt32BE(7);
  return d.bytes.toString('utf8', 11, 11 + len);
};

describe('prepared statements in transaction mode', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack({ pool: { mode: 'transaction', default_size: 2, max_prepared_statements: 2 } });
  });
  after(() => stack?.stop());
  const login = () => rawLogin(stack.port, { user: 'app', password: USERS.app });

  test('a Parse that failed leaves no statement behind: the name can be parsed again', async () => {
    const c = await login();
    const bad = await batch(c, P('s1', 'selec 1'), S());
    assert.equal(types(bad), 'EZ');
    assert.equal(codeOf(bad), '42601');
    const good = await batch(c, P('s1', 'select 11::text'), B('s1'), E(), S());
    assert.equal(types(good), '12DCZ');
    assert.equal(firstValue(good), '11');
    c.destroy();
  });

  test('parsing an existing name fails with 42P05 like PostgreSQL; Close frees the name', async () => {
    const c = await login();
    assert.equal(types(await batch(c, P('dup', 'select 1'), S())), '1Z');
    const again = await batch(c, P('dup', 'select 2'), B('dup'), E(), S());
    assert.equal(types(again), 'EZ');
    assert.equal(codeOf(again), '42P05');
    assert.equal(types(await batch(c, C('dup'), S())), '3Z');
    const redefined = await batch(c, P('dup', 'select 22::text'), B('dup'), E(), S());
    assert.equal(firstValue(redefined), '22');
    c.destroy();
  });

  test('an unknown statement gives 26000 and the batch is skipped to Sync; earlier work stands', async () => {
    const c = await login();
    const r = await batch(c, P('before', 'select 5::text'), B('nope'), E(), P('after', 'select 6'), S());
    assert.equal(types(r), '1EZ');
    assert.equal(codeOf(r), '26000');
    assert.equal(firstValue(await batch(c, B('before'), E(), S())), '5', 'statement parsed before the error exists');
    const missing = await batch(c, B('after'), E(), S());
    assert.equal(codeOf(missing), '26000', 'statement after the error was skipped, as PostgreSQL would');
    c.destroy();
  });

  test('an execution error skips later Parses; the books follow', async () => {
    const c = await login();
    const r = await batch(c, P('', 'select 1/x from generate_series(0, 0) x'), B(''), E(), P('skipped', 'select 7'), S());
    assert.equal(types(r), '12EZ');
    assert.equal(codeOf(r), '22012');
    assert.equal(codeOf(await batch(c, B('skipped'), E(), S())), '26000');
    assert.equal(types(await batch(c, P('skipped', 'select 8::text'), B('skipped'), E(), S())), '12DCZ');
    c.destroy();
  });

  test('statements survive eviction (max 2 per server connection) and moving between server connections', async () => {
    const a = await login();
    const b = await login();
    for (let i = 0; i < 5; i++) assert.equal(types(await batch(a, P(`q${i}`, `select ${i}::text || $1`), S())), '1Z');
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 5; i++) {
        // b holds a transaction now and then, so a lands on either server connection.
        if (i % 2 === round % 2) await batch(b, P('', 'begin'), B(''), E(), S());
        const r = await batch(a, D(`q${i}`), B(`q${i}`, ['x']), E(), S());
        assert.equal(types(r).replace(/^1/, ''), 'tT2DCZ', `round ${round} statement ${i}: ${types(r)}`);
        assert.equal(firstValue(r), `${i}x`);
        if (i % 2 === round % 2) await batch(b, P('', 'commit'), B(''), E(), S());
      }
    }
    a.destroy();
    b.destroy();
  });
});
