/**
 * Protocol versions: 3.0 and 3.2 are spoken; other minors and _pq_ options are negotiated down
 * with NegotiateProtocolVersion. With 3.2 the gateway issues 32-byte cancel keys, and a
 * CancelRequest carrying such a key cancels the client's query. Also: log lines carry a
 * connection id, and connect/auth/disconnect are logged at info.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { startStack, USERS, type Stack } from './helpers/stack.js';
import { rawLogin, errorFields, type BackendMessage } from './helpers/raw-client.js';
import { cancelRequest, queryMessage } from '../src/protocol/frontend.js';
import { startupMessage } from '../src/protocol/frontend.js';

function keyData(ms: BackendMessage[]): { pid: number; key: Buffer } {
  const k = ms.find((m) => m.type === 'K')!;
  return { pid: k.bytes.readInt32BE(5), key: k.bytes.subarray(9) };
}

function sendCancel(port: number, pid: number, key: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1' }, () => s.end(cancelRequest(pid, key)));
    s.on('close', () => resolve());
    s.on('error', reject);
  });
}

describe('protocol negotiation and logs', () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack({ pool: { mode: 'transaction', default_size: 2 } });
  });
  after(() => stack?.stop());

  test('protocol 3.2: no negotiation, 32-byte cancel key that works', async () => {
    const preAuth: BackendMessage[] = [];
    const afterAuth: BackendMessage[] = [];
    const c = await rawLogin(stack.port, { user: 'app', password: USERS.app, protocolMinor: 2, preAuth, afterAuth });
    assert.equal(preAuth.length, 0, 'no NegotiateProtocolVersion for 3.2');
    const { pid, key } = keyData(afterAuth);
    assert.equal(key.length, 32);
    c.write(queryMessage('select pg_sleep(20)'));
    await new Promise((r) => setTimeout(r, 300));
    await sendCancel(stack.port, pid, key);
    const reply = await c.until('Z', 5000);
    const err = reply.find((m) => m.type === 'E');
    assert.ok(err, 'query was cancelled');
    assert.equal(errorFields(err!).C, '57014');
    c.destroy();
  });

  test('protocol 3.0 keeps 4-byte keys; 3.1 and 3.3 are negotiated down; _pq_ options are declined', async () => {
    const afterAuth: BackendMessage[] = [];
    const c0 = await rawLogin(stack.port, { user: 'app', password: USERS.app, afterAuth });
    assert.equal(keyData(afterAuth).key.length, 4);
    c0.destroy();
    for (const [minor, expected] of [
      [1, 0],
      [3, 2],
    ]) {
      const preAuth: BackendMessage[] = [];
      afterAuth.length = 0;
      const c = await rawLogin(stack.port, { user: 'app', password: USERS.app, protocolMinor: minor, preAuth, afterAuth, params: { '_pq_.test_option': 'x' } });
      assert.equal(preAuth.length, 1, `NegotiateProtocolVersion for 3.${minor}`);
      const v = preAuth[0].bytes;
      assert.equal(v.readInt32BE(5), (3 << 16) | expected);
      assert.equal(v.readInt32BE(9), 1);
      assert.equal(v.toString('utf8', 13, v.length - 1), '_pq_.test_option');
      // The cancel key follows the negotiated version: 32 bytes for 3.2, 4 for 3.0.
      assert.equal(keyData(afterAuth).key.length, expected === 2 ? 32 : 4);
      c.write(queryMessage('select 1'));
      assert.ok((await c.until('Z')).some((m) => m.type === 'D'));
      c.destroy();
    }
  });

  test('every connection log line carries its connection id; connect, auth result and disconnect at info', async () => {
    const c = await rawLogin(stack.port, { user: 'app', password: USERS.app });
    c.write(queryMessage('select 1'));
    await c.until('Z');
    c.destroy();
    // A failed login is logged too.
    const bad = net.connect({ port: stack.port, host: '127.0.0.1' });
    bad.on('error', () => undefined);
    bad.write(startupMessage([['user', 'nobody_here'], ['database', 'postgres']]));
    await new Promise((r) => setTimeout(r, 300));
    bad.destroy();
    await new Promise((r) => setTimeout(r, 300));
    const lines = stack.logs.filter((l) => typeof l.conn === 'string');
    const byMsg = (m: string) => lines.filter((l) => l.msg === m);
    assert.ok(byMsg('client connected').length >= 2);
    assert.ok(byMsg('client authenticated').length >= 1);
    assert.ok(byMsg('client disconnected').length >= 1);
    for (const l of [...byMsg('client connected'), ...byMsg('client authenticated'), ...byMsg('client disconnected')]) {
      assert.equal(l.level, 30, 'info level');
      assert.match(String(l.conn), /^c\d+$/);
    }
    const connected = byMsg('client connected').find((l) => l.user === 'app');
    assert.ok(connected?.remote, 'client address logged');
    // No secret ever appears in the logs.
    const all = JSON.stringify(stack.logs);
    assert.ok(!all.includes(USERS.app));
  });
});
