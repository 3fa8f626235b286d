import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { startStack, type Stack } from './helpers/stack.js';

let stack: Stack;
before(async () => {
  stack = await startStack();
});
after(() => stack?.stop());

test('simple query through the gateway', async () => {
  const c = new pg.Client(stack.clientConfig('app'));
  await c.connect();
  const r = await c.query('select current_user as u, 1 + 1 as two');
  assert.equal(r.rows[0].u, 'app');
  assert.equal(r.rows[0].two, 2);
  const r2 = await c.query({ text: 'select $1::int + 1 as n', values: [41] });
  assert.equal(r2.rows[0].n, 42);
  const r3 = await c.query({ name: 'named1', text: 'select $1::text as t', values: ['x'] });
  assert.equal(r3.rows[0].t, 'x');
  const r4 = await c.query({ name: 'named1', text: 'select $1::text as t', values: ['y'] });
  assert.equal(r4.rows[0].t, 'y');
  await c.end();
});

test('notices and notifications reach the client in transaction mode', async () => {
  const c = new pg.Client(stack.clientConfig('app'));
  await c.connect();
  const notices: string[] = [];
  c.on('notice', (n) => notices.push(n.message ?? ''));
  await c.query(`DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$`);
  assert.deepEqual(notices, ['hello from the server']);
  const got = new Promise<string>((resolve) => c.on('notification', (m) => resolve(m.payload ?? '')));
  await c.query('LISTEN smoke_channel');
  const other = new pg.Client(stack.clientConfig('bob'));
  await other.connect();
  await other.query(`NOTIFY smoke_channel, 'ping'`);
  assert.equal(await got, 'ping');
  await Promise.all([c.end(), other.end()]);
});
