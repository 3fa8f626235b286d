/**
 * TLS on both sides and client authentication, with real clients (psql, node-postgres, raw
 * sockets): TLS required for clients, SSLRequest hardening, verify-full towards PostgreSQL,
 * SCRAM, md5, wrong passwords and unknown users, and a users file instead of the auth query.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import copyStreams from 'pg-copy-streams';
import { preparePostgres, startGateway, stackOf, USERS, type Stack } from './helpers/stack.js';
import type { EmbeddedPostgres } from './helpers/postgres.js';
import { createGateway } from '../src/gateway.js';
import { createLogger } from '../src/log/logger.js';
import { generateCertificates, type GeneratedCertificates } from '../src/tls/context.js';
import { interruptPsqlSleep } from './helpers/psql.js';

const MODES = ['transaction', 'session'] as const;

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

function psql(conninfo: string, args: string[], password: string): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      'psql',
      ['-X', '-A', '-t', '-d', conninfo, ...args],
      { env: { ...process.env, PGPASSWORD: password, PGCONNECT_TIMEOUT: '5' }, timeout: 20_000, killSignal: 'SIGKILL' },
      (err, stdout, stderr) => {
        if (err && (err as NodeJS.ErrnoException).code === 'ENOENT') return reject(err);
        if (err?.killed) return reject(new Error(`psql timed out\n${stderr}`));
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout: String(stdout), stderr: String(stderr) });
      },
    );
  });
}

async function pgConnect(config: pg.ClientConfig): Promise<pg.Client> {
  const c = new pg.Client({ connectionTimeoutMillis: 10_000, ...config });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

/** Connects, expecting a failure; returns the error. */
async function pgConnectError(config: pg.ClientConfig): Promise<Error & { code?: string; severity?: string }> {
  const c = new pg.Client({ connectionTimeoutMillis: 10_000, ...config });
  c.on('error', () => undefined);
  try {
    await c.connect();
  } catch (err) {
    return err as Error & { code?: string };
  } finally {
    await c.end().catch(() => undefined);
  }
  throw new Error('connection unexpectedly succeeded');
}

/** Decodes the fields of an ErrorResponse message body (after type and length). */
function errorFields(body: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let pos = 0;
  while (pos < body.length && body[pos] !== 0) {
    const code = String.fromCharCode(body[pos]);
    const end = body.indexOf(0, pos + 1);
    out[code] = body.toString('utf8', pos + 1, end);
    pos = end + 1;
  }
  return out;
}

/** Writes `data` in one go and collects everything until the gateway closes the connection. */
function rawExchange(port: number, data: Buffer, timeoutMs = 5000): Promise<{ bytes: Buffer; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const s = net.connect({ host: '127.0.0.1', port }, () => s.write(data));
    const timer = setTimeout(() => {
      s.destroy();
      resolve({ bytes: Buffer.concat(chunks), closed: false });
    }, timeoutMs);
    s.on('data', (c) => chunks.push(c));
    s.on('error', (err) => {
      clearTimeout(timer);
      if ((err as NodeJS.ErrnoException).code === 'ECONNRESET') resolve({ bytes: Buffer.concat(chunks), closed: true });
      else reject(err);
    });
    s.on('close', () => {
      clearTimeout(timer);
      resolve({ bytes: Buffer.concat(chunks), closed: true });
    });
  });
}

function cancelPacket(processId: number, secretKey: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeInt32BE(16, 0);
  b.writeInt32BE(80877102, 4);
  b.writeInt32BE(processId, 8);
  b.writeUInt32BE(secretKey >>> 0, 12);
  return b;
}

/** SSLRequest, TLS handshake, then a CancelRequest inside TLS (as libpq 17+ does). */
function tlsCancel(port: number, ca: string, processId: number, secretKey: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const raw = net.connect({ host: '127.0.0.1', port }, () => raw.write(sslRequest()));
    const timer = setTimeout(() => {
      raw.destroy();
      reject(new Error('TLS cancel timed out'));
    }, 5000);
    raw.once('error', reject);
    raw.once('data', (answer) => {
      if (answer.toString() !== 'S') {
        clearTimeout(timer);
        raw.destroy();
        reject(new Error(`SSLRequest answered ${answer.toString()}`));
        return;
      }
      const s = tls.connect({ socket: raw, ca: fs.readFileSync(ca), servername: 'localhost' }, () => s.end(cancelPacket(processId, secretKey)));
      s.on('error', () => undefined);
      s.on('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  });
}

function sslRequest(): Buffer {
  const b = Buffer.alloc(8);
  b.writeInt32BE(8, 0);
  b.writeInt32BE(80877103, 4);
  return b;
}

function startupPacket(params: Record<string, string>): Buffer {
  const body = Buffer.concat([
    ...Object.entries(params).flatMap(([k, v]) => [Buffer.from(`${k}\0`), Buffer.from(`${v}\0`)]),
    Buffer.from([0]),
  ]);
  const head = Buffer.alloc(8);
  head.writeInt32BE(8 + body.length, 0);
  head.writeInt32BE(196608, 4);
  return Buffer.concat([head, body]);
}

let tmp: string;
let clientCerts: GeneratedCertificates;
let serverCerts: GeneratedCertificates;
/** Plain PostgreSQL (with an md5 hba line for md5user). */
let plainPg: EmbeddedPostgres;
/** PostgreSQL with ssl=on, certificate from a second CA. */
let sslPg: EmbeddedPostgres;

before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-tls-'));
  clientCerts = generateCertificates(tmp, ['localhost', '127.0.0.1'], 'gateway');
  serverCerts = generateCertificates(tmp, ['localhost', '127.0.0.1'], 'pgserver');
  [plainPg, sslPg] = await Promise.all([
    preparePostgres({ hbaLines: ['host all md5user 127.0.0.1/32 md5'] }),
    preparePostgres({ ssl: { certFile: serverCerts.cert, keyFile: serverCerts.key } }),
  ]);
  await plainPg.query(`SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'`);
});

after(async () => {
  await Promise.all([plainPg?.stop(), sslPg?.stop()]);
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

for (const mode of MODES) {
  describe(`client TLS required (${mode} mode)`, () => {
    let stack: Stack;
    before(async () => {
      const { gw, logs } = await startGateway(plainPg, {
        pool: { mode },
        tls: { mode: 'require', cert_file: clientCerts.cert, key_file: clientCerts.key },
      });
      stack = stackOf(plainPg, gw, logs, false);
    });
    after(() => stack?.gw.stop(1000));

    const conninfo = (extra: string) => `host=localhost hostaddr=127.0.0.1 port=${stack.port} user=app dbname=postgres ${extra}`;

    test('psql with sslmode=verify-full succeeds over TLS', async () => {
      const r = await psql(conninfo(`sslmode=verify-full sslrootcert=${clientCerts.caCert}`), ['-c', 'select 40 + 2', '-c', '\\conninfo'], USERS.app);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^42$/m);
      assert.match(r.stdout, /SSL connection \(protocol: TLSv1\.[23]/);
    });

    test('psql with sslmode=disable is refused with a clear error', async () => {
      const r = await psql(conninfo('sslmode=disable'), ['-c', 'select 1'], USERS.app);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, /FATAL: {2}SSL is required/);
      assert.doesNotMatch(r.stdout, /1/);
    });

    test('psql verify-full against the wrong CA fails on the client side', async () => {
      const r = await psql(conninfo(`sslmode=verify-full sslrootcert=${serverCerts.caCert}`), ['-c', 'select 1'], USERS.app);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /certificate verify failed/);
    });

    test('node-postgres with ssl { ca, servername } succeeds; without TLS is refused', async () => {
      const c = await pgConnect({
        ...stack.clientConfig('app'),
        ssl: { ca: fs.readFileSync(clientCerts.caCert, 'utf8'), servername: 'localhost' },
      });
      try {
        assert.equal((await c.query('select $1::int * 2 as v', [21])).rows[0].v, 42);
        assert.equal((await c.query('select current_user as u')).rows[0].u, 'app');
      } finally {
        await c.end();
      }
      const err = await pgConnectError({ ...stack.clientConfig('app'), ssl: false });
      assert.equal(err.code, '28000');
      assert.match(err.message, /SSL is required/);
      // The gateway logged the TLS client.
      assert.ok(stack.logs.some((l) => l.msg === 'client connected' && l.tls === true));
    });

    test('large COPY in both directions over TLS', async () => {
      const c = await pgConnect({
        ...stack.clientConfig('app'),
        ssl: { ca: fs.readFileSync(clientCerts.caCert, 'utf8'), servername: 'localhost' },
      });
      try {
        const table = `tls_copy_${mode}`;
        await c.query(`drop table if exists ${table}`);
        await c.query(`create table ${table} (id int, v text)`);
        const lines: string[] = [];
        for (let i = 1; i <= 100_000; i++) lines.push(`${i}\t${'x'.repeat(i % 50)}\n`);
        const payload = Buffer.from(lines.join(''));
        await pipeline(Readable.from([payload]), c.query(copyStreams.from(`copy ${table} from stdin`)));
        const out: Buffer[] = [];
        await pipeline(
          c.query(copyStreams.to(`copy (select id, v from ${table} order by id) to stdout`)),
          new Writable({
            write(chunk: Buffer, _e, cb) {
              out.push(chunk);
              setImmediate(cb); // a slow reader: exercises back-pressure through the TLS socket
            },
          }),
        );
        const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');
        assert.equal(md5(Buffer.concat(out)), md5(payload));
        assert.equal((await c.query(`select count(*)::int as n from ${table}`)).rows[0].n, 100_000);
      } finally {
        await c.end();
      }
    });

    test('cancel works with a plain CancelRequest (libpq < 17, psql SIGINT) and inside TLS', async () => {
      const { code, stderr } = await interruptPsqlSleep(['-d', conninfo(`sslmode=verify-full sslrootcert=${clientCerts.caCert}`)], USERS.app, plainPg);
      assert.equal(code, 1, stderr);
      assert.match(stderr, /canceling statement due to user request/);
      const c = (await pgConnect({
        ...stack.clientConfig('app'),
        ssl: { ca: fs.readFileSync(clientCerts.caCert, 'utf8'), servername: 'localhost' },
      })) as pg.Client & { processID: number; secretKey: number };
      try {
        const q = c.query('select pg_sleep(30)').catch((e) => e);
        await new Promise((r) => setTimeout(r, 300));
        await tlsCancel(stack.port, clientCerts.caCert, c.processID, c.secretKey);
        assert.equal((await q).code, '57014');
        assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
      } finally {
        await c.end();
      }
    });

    test('GSSENCRequest is declined with N, then SSLRequest and TLS proceed to authentication', async () => {
      const raw = net.connect({ host: '127.0.0.1', port: stack.port });
      raw.on('error', () => undefined);
      const readOne = (sock: net.Socket) =>
        new Promise<Buffer>((resolve, reject) => {
          const t = setTimeout(() => reject(new Error('no answer within 5 s')), 5000);
          sock.once('data', (d: Buffer) => {
            clearTimeout(t);
            resolve(d);
          });
        });
      try {
        await new Promise<void>((r) => raw.once('connect', () => r()));
        const gss = Buffer.alloc(8);
        gss.writeInt32BE(8, 0);
        gss.writeInt32BE(80877104, 4);
        raw.write(gss);
        assert.equal((await readOne(raw)).toString(), 'N');
        raw.write(sslRequest());
        assert.equal((await readOne(raw)).toString(), 'S');
        const secure = tls.connect({ socket: raw, ca: fs.readFileSync(clientCerts.caCert), servername: 'localhost' });
        secure.on('error', () => undefined);
        await new Promise<void>((r, j) => {
          secure.once('secureConnect', () => r());
          secure.once('error', j);
        });
        secure.write(startupPacket({ user: 'app', database: 'postgres' }));
        const auth = await readOne(secure);
        assert.equal(String.fromCharCode(auth[0]), 'R', 'authentication request expected');
        assert.equal(auth.readInt32BE(5), 10, 'AuthenticationSASL');
        assert.match(auth.toString('latin1', 9), /SCRAM-SHA-256/);
        secure.destroy();
      } finally {
        raw.destroy();
      }
    });

    test('bytes pipelined after the SSLRequest get FATAL 08P01 and a closed connection', async () => {
      const { bytes, closed } = await rawExchange(stack.port, Buffer.concat([sslRequest(), startupPacket({ user: 'app', database: 'postgres' })]));
      assert.ok(closed, 'the gateway must close the connection');
      assert.ok(bytes.length > 0, 'an ErrorResponse is sent');
      assert.notEqual(bytes[0], 0x53, 'must not answer S (TLS) with injected bytes pending');
      assert.equal(String.fromCharCode(bytes[0]), 'E');
      const len = bytes.readInt32BE(1);
      const fields = errorFields(bytes.subarray(5, 1 + len));
      assert.equal(fields.S, 'FATAL');
      assert.equal(fields.C, '08P01');
      assert.match(fields.M, /unencrypted data after SSL request/);
      assert.equal(bytes.length, 1 + len, 'nothing after the error');
      // Every connection of this describe (refused, cancelled, abandoned mid-handshake) is forgotten.
      for (let i = 0; i < 100 && stack.gw.clientCount > 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(stack.gw.clientCount, 0);
    });
  });

  describe(`server TLS verify-full towards PostgreSQL (${mode} mode)`, () => {
    test('queries work and pg_stat_ssl shows the gateway backend on TLS', async () => {
      const { gw, logs } = await startGateway(sslPg, {
        pool: { mode },
        server: { tls: { mode: 'verify-full', ca_file: serverCerts.caCert, server_name: 'localhost' } },
      });
      const stack = stackOf(sslPg, gw, logs, false);
      try {
        const c = await pgConnect(stack.clientConfig('app'));
        try {
          const r = await c.query('select s.ssl, s.version, pg_backend_pid() as pid from pg_stat_ssl s where s.pid = pg_backend_pid()');
          assert.equal(r.rows[0].ssl, true);
          assert.match(r.rows[0].version, /^TLSv1\.[23]$/);
          const pid = r.rows[0].pid;
          // Seen from the superuser directly: every backend of app and of the auth role uses TLS.
          const rows = await sslPg.query<{ usename: string; ssl: boolean; pid: number }>(
            `select a.usename, s.ssl, a.pid from pg_stat_activity a join pg_stat_ssl s using (pid)
             where a.usename in ('app', 'trustgate_auth') and a.backend_type = 'client backend'`,
          );
          assert.ok(rows.some((x) => x.pid === pid && x.ssl === true));
          assert.ok(rows.length >= 2);
          assert.ok(rows.every((x) => x.ssl === true), JSON.stringify(rows));
          // Cancel also goes over TLS to the server.
          const q = c.query('select pg_sleep(30)').catch((e) => e);
          await new Promise((res) => setTimeout(res, 300));
          const cc = c as pg.Client & { processID: number; secretKey: number };
          await rawExchange(stack.port, cancelPacket(cc.processID, cc.secretKey));
          assert.equal((await q).code, '57014');
        } finally {
          await c.end();
        }
      } finally {
        await gw.stop(1000);
      }
    });

    test('a wrong CA fails with a clear error to the client', async () => {
      const { gw, logs } = await startGateway(sslPg, {
        pool: { mode, wait_timeout_ms: 2000 },
        // The gateway-facing CA did not sign PostgreSQL's certificate.
        server: { tls: { mode: 'verify-full', ca_file: clientCerts.caCert, server_name: 'localhost' } },
      });
      const stack = stackOf(sslPg, gw, logs, false);
      try {
        const started = Date.now();
        const err = await pgConnectError(stack.clientConfig('app'));
        assert.ok(Date.now() - started < 8000);
        assert.match(err.message, /TLS|certificate/i, err.message);
        assert.match(err.message, /server/i);
        assert.doesNotMatch(err.message, /internal error/i);
        assert.ok(err.code?.startsWith('08'), `connection-exception class SQLSTATE expected, got ${err.code}: ${err.message}`);
        const r = await psql(`host=127.0.0.1 port=${stack.port} user=app dbname=postgres sslmode=disable`, ['-c', 'select 1'], USERS.app);
        assert.equal(r.code, 2);
        assert.match(r.stderr, /FATAL: .*(TLS|certificate)/i);
      } finally {
        await gw.stop(1000);
      }
    });

    test('a wrong CA on pool connections (secrets from a users file) also gives a clear error', async () => {
      const [row] = await sslPg.query<{ rolpassword: string }>(`select rolpassword from pg_authid where rolname = 'app'`);
      const file = path.join(tmp, `users-ssl-${mode}.yaml`);
      fs.writeFileSync(file, `users:\n  app: "${row.rolpassword}"\n`);
      const gw = createGateway(
        {
          listen: { host: '127.0.0.1', port: 0 },
          server: { host: sslPg.host, port: sslPg.port, tls: { mode: 'verify-full', ca_file: clientCerts.caCert, server_name: 'localhost' } },
          auth: { method: 'scram-sha-256', users_file: file },
          pool: { mode, default_size: 2, wait_timeout_ms: 1500 },
          log: { level: 'silent' },
        },
        { logger: createLogger('silent') },
      );
      await gw.start();
      try {
        const err = await pgConnectError(stackOf(sslPg, gw, [], false).clientConfig('app'));
        assert.match(err.message, /TLS handshake with server failed/, err.message);
        assert.match(err.message, /certificate/, err.message);
        assert.ok(err.code?.startsWith('08'), `${err.code}: ${err.message}`);
      } finally {
        await gw.stop(1000);
      }
    });

    test('verify-full with a wrong server_name fails', async () => {
      const { gw, logs } = await startGateway(sslPg, {
        pool: { mode, wait_timeout_ms: 2000 },
        server: { tls: { mode: 'verify-full', ca_file: serverCerts.caCert, server_name: 'db.example.com' } },
      });
      const stack = stackOf(sslPg, gw, logs, false);
      try {
        const err = await pgConnectError(stack.clientConfig('app'));
        assert.match(err.message, /db\.example\.com|altnames|hostname/i, err.message);
      } finally {
        await gw.stop(1000);
      }
    });
  });

  describe(`authentication (${mode} mode)`, () => {
    let stack: Stack;
    before(async () => {
      const { gw, logs } = await startGateway(plainPg, { pool: { mode } });
      stack = stackOf(plainPg, gw, logs, false);
    });
    after(() => stack?.gw.stop(1000));

    test('SCRAM with psql and node-postgres', async () => {
      const r = await psql(`host=127.0.0.1 port=${stack.port} user=alice dbname=postgres sslmode=disable`, ['-c', 'select current_user'], USERS.alice);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), 'alice');
      const c = await pgConnect(stack.clientConfig('bob'));
      try {
        assert.equal((await c.query('select current_user as u')).rows[0].u, 'bob');
      } finally {
        await c.end();
      }
      // The gateway never saw a password: server logins use the SCRAM keys from the client proof.
      const ok = stack.logs.filter((l) => l.msg === 'client authenticated' && l.method === 'scram-sha-256');
      assert.ok(ok.length >= 2);
    });

    test('a wrong password gives 28P01 "password authentication failed"', async () => {
      const err = await pgConnectError({ ...stack.clientConfig('app'), password: 'wrong' });
      assert.equal(err.code, '28P01');
      assert.equal(err.message, 'password authentication failed for user "app"');
      const r = await psql(`host=127.0.0.1 port=${stack.port} user=app dbname=postgres sslmode=disable`, ['-c', 'select 1'], 'wrong');
      assert.equal(r.code, 2);
      assert.match(r.stderr, /FATAL: {2}password authentication failed for user "app"/);
    });

    test('an unknown user gets the same message (no user enumeration)', async () => {
      const err = await pgConnectError({ ...stack.clientConfig('app'), user: 'ghost', password: 'whatever' });
      assert.equal(err.code, '28P01');
      assert.equal(err.message, 'password authentication failed for user "ghost"');
      const known = await pgConnectError({ ...stack.clientConfig('app'), user: 'alice', password: 'whatever' });
      assert.equal(known.code, err.code);
      assert.equal(known.message.replace('alice', 'ghost'), err.message);
      const r = await psql(`host=127.0.0.1 port=${stack.port} user=ghost dbname=postgres sslmode=disable`, ['-c', 'select 1'], 'whatever');
      assert.equal(r.code, 2);
      assert.match(r.stderr, /FATAL: {2}password authentication failed for user "ghost"/);
      // A superuser's secret is never served by the auth query: same answer as an unknown user.
      const su = await pgConnectError({ ...stack.clientConfig('app'), user: plainPg.superuser, password: plainPg.superuserPassword });
      assert.equal(su.code, '28P01');
    });

    test('an unknown database is reported like PostgreSQL does', async () => {
      const err = await pgConnectError({ ...stack.clientConfig('app'), database: 'nosuchdb' });
      assert.equal(err.code, '3D000');
      assert.equal(err.message, 'database "nosuchdb" does not exist');
      const r = await psql(`host=127.0.0.1 port=${stack.port} user=app dbname=nosuchdb sslmode=disable`, ['-c', 'select 1'], USERS.app);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /FATAL: {2}database "nosuchdb" does not exist/);
    });

    test('failed logins leave no client sessions behind', async () => {
      await Promise.all([
        pgConnectError({ ...stack.clientConfig('app'), password: 'wrong' }),
        pgConnectError({ ...stack.clientConfig('app'), user: 'ghost', password: 'x' }),
        pgConnectError({ ...stack.clientConfig('app'), database: 'nosuchdb' }),
      ]);
      for (let i = 0; i < 100 && stack.gw.clientCount > 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(stack.gw.clientCount, 0);
    });

    test('auth.method md5 with an md5-stored role works end to end', async () => {
      const [row] = await plainPg.query<{ rolpassword: string }>(`select rolpassword from pg_authid where rolname = 'md5user'`);
      assert.match(row.rolpassword, /^md5[0-9a-f]{32}$/);
      const { gw, logs } = await startGateway(plainPg, { pool: { mode }, auth: { method: 'md5' } });
      const md5Stack = stackOf(plainPg, gw, logs, false);
      try {
        const c = await pgConnect({ ...md5Stack.clientConfig('md5user'), password: 'md5-pw' });
        try {
          assert.equal((await c.query('select current_user as u')).rows[0].u, 'md5user');
          assert.equal((await c.query('select $1::int + 1 as n', [1])).rows[0].n, 2);
        } finally {
          await c.end();
        }
        const r = await psql(`host=127.0.0.1 port=${md5Stack.port} user=md5user dbname=postgres sslmode=disable`, ['-c', 'select current_user'], 'md5-pw');
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stdout.trim(), 'md5user');
        // The server side really used md5 for md5user (hba line), and the gateway used the hash.
        const bad = await pgConnectError({ ...md5Stack.clientConfig('md5user'), password: 'nope' });
        assert.equal(bad.code, '28P01');
        assert.equal(bad.message, 'password authentication failed for user "md5user"');
        const ghost = await pgConnectError({ ...md5Stack.clientConfig('md5user'), user: 'ghost', password: 'nope' });
        assert.equal(ghost.code, '28P01');
        assert.equal(ghost.message, 'password authentication failed for user "ghost"');
        // A role with a SCRAM secret still logs in under method md5 (done with SCRAM, as PostgreSQL does).
        const s = await pgConnect(md5Stack.clientConfig('alice'));
        assert.equal((await s.query('select current_user as u')).rows[0].u, 'alice');
        await s.end();
      } finally {
        await gw.stop(1000);
      }
    });

    test('a users file with a SCRAM verifier works instead of the auth query', async () => {
      const [row] = await plainPg.query<{ rolpassword: string }>(`select rolpassword from pg_authid where rolname = 'app'`);
      assert.match(row.rolpassword, /^SCRAM-SHA-256\$/);
      const file = path.join(tmp, `users-${mode}.yaml`);
      fs.writeFileSync(file, `users:\n  app: "${row.rolpassword}"\n`);
      // No auth.user: the users file is the only source of secrets.
      const gw = createGateway(
        {
          listen: { host: '127.0.0.1', port: 0 },
          server: { host: plainPg.host, port: plainPg.port, tls: { mode: 'disable' } },
          auth: { method: 'scram-sha-256', users_file: file },
          pool: { mode, default_size: 2, wait_timeout_ms: 5000 },
          log: { level: 'silent' },
        },
        { logger: createLogger('silent') },
      );
      await gw.start();
      const fileStack = stackOf(plainPg, gw, [], false);
      try {
        const c = await pgConnect(fileStack.clientConfig('app'));
        try {
          assert.equal((await c.query('select current_user as u')).rows[0].u, 'app');
        } finally {
          await c.end();
        }
        const r = await psql(`host=127.0.0.1 port=${fileStack.port} user=app dbname=postgres sslmode=disable`, ['-c', 'select 1'], USERS.app);
        assert.equal(r.code, 0, r.stderr);
        const wrong = await pgConnectError({ ...fileStack.clientConfig('app'), password: 'wrong' });
        assert.equal(wrong.code, '28P01');
        // bob exists in PostgreSQL but not in the file: refused like an unknown user.
        const bob = await pgConnectError(fileStack.clientConfig('bob'));
        assert.equal(bob.code, '28P01');
        assert.equal(bob.message, 'password authentication failed for user "bob"');
      } finally {
        await gw.stop(1000);
      }
    });
  });
}

test('a users file with a plaintext password is refused when the gateway is created', () => {
  const file = path.join(tmp, 'users-plain.yaml');
  fs.writeFileSync(file, 'users:\n  app: "app-pw"\n');
  assert.throws(
    () =>
      createGateway(
        {
          listen: { host: '127.0.0.1', port: 0 },
          server: { host: plainPg.host, port: plainPg.port, tls: { mode: 'disable' } },
          auth: { users_file: file },
          log: { level: 'silent' },
        },
        { logger: createLogger('silent') },
      ),
    (err: Error) => /users\.app/.test(err.message) && /plaintext passwords are not accepted/.test(err.message),
  );
  // A well-formed md5 hash is accepted.
  fs.writeFileSync(file, `users:\n  app: "md5${'0'.repeat(32)}"\n`);
  const gw = createGateway(
    { listen: { host: '127.0.0.1', port: 0 }, server: { host: plainPg.host, port: plainPg.port }, auth: { users_file: file }, log: { level: 'silent' } },
    { logger: createLogger('silent') },
  );
  assert.ok(gw);
});
