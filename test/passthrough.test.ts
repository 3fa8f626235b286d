/**
 * TLS passthrough (issue 5, "Direct security sessions"), end to end with real PostgreSQL servers
 * and real clients (psql 15 / libpq, node-postgres, postgres.js, raw sockets):
 * verify-full against the server's own CA with SCRAM-SHA-256-PLUS channel binding while trustgate
 * holds no key, client-certificate auth, SNI routing to two servers, PostgreSQL 17+ direct TLS,
 * cancel, SHOW CLIENTS, and every bad-input case (connection closed, nothing forwarded
 * unencrypted, other clients unaffected, the servers never saw the bad client).
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { X509Certificate } from 'node:crypto';
import pg from 'pg';
import postgres from 'postgres';
import { preparePostgres, startGateway, USERS } from './helpers/stack.js';
import type { EmbeddedPostgres } from './helpers/postgres.js';
import type { Gateway } from '../src/gateway.js';
import { generateCertificates, type GeneratedCertificates } from '../src/tls/context.js';
import { interruptPsqlSleep, run, type RunResult } from './helpers/psql.js';
import { errorFields } from './helpers/raw-client.js';
import { startupMessage } from '../src/protocol/frontend.js';
import {
  collectUntilClosed,
  gssencRequest,
  readBytes,
  scramLoginOver,
  simpleQuery,
  sslRequest,
  tcpConnect,
  terminate,
  tlsClient,
} from './helpers/passthrough-raw.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let tmp: string;
/** Server certificates: A (a.db.test), B (b.db.test), each from its own CA; trustgate's own (localhost). */
let certsA: GeneratedCertificates;
let certsB: GeneratedCertificates;
let certsGw: GeneratedCertificates;
/** Client certificate CN=certuser from the CA PostgreSQL A trusts; and one from a CA nobody trusts. */
let clientCerts: GeneratedCertificates;
let rogueCerts: GeneratedCertificates;

/** PostgreSQL A and B (ssl on, distinct CAs) and a PostgreSQL without ssl (answers N). */
let pgA: EmbeddedPostgres;
let pgB: EmbeddedPostgres;
let pgPlain: EmbeddedPostgres;
const serverLog: Record<'a' | 'b' | 'plain', string[]> = { a: [], b: [], plain: [] };

/** A fake "server" that answers SSLRequest as told and records every byte it receives. */
let fake: net.Server;
let fakeAnswer: Buffer = Buffer.from('N');
/** Delay before the fake answers (to let a client vanish while trustgate waits). */
let fakeDelayMs = 0;
const fakeReceived: Buffer[][] = [];
const fakeSockets: net.Socket[] = [];

/** Passthrough listener, trustgate has no TLS certificate at all (tls.mode disable). */
let gwPass: Gateway;
/** Passthrough listener with unmatched: server (→ PostgreSQL B). */
let gwUnmatched: Gateway;
/** Pooled listener terminating TLS with its own certificate, a.db.test passed through. */
let gwPooled: Gateway;
/** Pooled listener without any TLS of its own, a.db.test passed through. */
let gwPooledNoTls: Gateway;
let gwPassLogs: Record<string, unknown>[];

const portOf = (gw: Gateway) => gw.address().port;
const fingerprint = (certFile: string) => new X509Certificate(fs.readFileSync(certFile)).fingerprint256;
const read = (f: string) => fs.readFileSync(f, 'utf8');

function psql(conninfo: string, sql: string, password: string = USERS.app): Promise<RunResult> {
  // HOME points at an empty directory: no ~/.postgresql client certificate or root.crt is picked up.
  return run('psql', ['-X', '-At', '-d', conninfo, '-c', sql], { PGPASSWORD: password, HOME: tmp }, 20_000);
}

/** libpq conninfo for a TLS client reaching `port` on 127.0.0.1 under the server name `host`. */
function ci(port: number, host: string, extra: string, user = 'app'): string {
  return `host=${host} hostaddr=127.0.0.1 port=${port} user=${user} dbname=postgres connect_timeout=5 ${extra}`;
}

async function pgConnect(config: pg.ClientConfig): Promise<pg.Client> {
  const c = new pg.Client({ connectionTimeoutMillis: 10_000, ...config });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

/** node-postgres through `port` to the server named `servername`, verifying the server against `ca`. */
function pgTlsConfig(port: number, servername: string, ca: string, extra: pg.ClientConfig = {}): pg.ClientConfig {
  return {
    host: '127.0.0.1',
    port,
    user: 'app',
    password: USERS.app,
    database: 'postgres',
    ssl: { ca: read(ca), servername, rejectUnauthorized: true },
    ...extra,
  };
}

/** The TLS socket node-postgres talks over (after the upgrade). */
function pgStream(c: pg.Client): tls.TLSSocket {
  return (c as unknown as { connection: { stream: tls.TLSSocket } }).connection.stream;
}

function countLines(lines: string[], what: string): number {
  return lines.filter((l) => l.includes(what)).length;
}

/** How many connections each PostgreSQL has received so far (log_connections). */
function received(): Record<'a' | 'b' | 'plain', number> {
  return {
    a: countLines(serverLog.a, 'connection received'),
    b: countLines(serverLog.b, 'connection received'),
    plain: countLines(serverLog.plain, 'connection received'),
  };
}

/** Runs `fn` and checks that no PostgreSQL server received a connection meanwhile. */
async function serversUntouched(fn: () => Promise<void>): Promise<void> {
  const before = received();
  await fn();
  await sleep(250);
  assert.deepEqual(received(), before, 'a PostgreSQL server received a connection from the refused client');
}

before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tg-passthrough-'));
  certsA = generateCertificates(tmp, ['a.db.test'], 'pga');
  certsB = generateCertificates(tmp, ['b.db.test'], 'pgb');
  certsGw = generateCertificates(tmp, ['localhost', '127.0.0.1'], 'gateway');
  // generateCertificates issues CN=<first name> from its own CA, with clientAuth usage: a client certificate.
  clientCerts = generateCertificates(tmp, ['certuser'], 'client');
  rogueCerts = generateCertificates(tmp, ['certuser'], 'rogue');
  for (const c of [clientCerts, rogueCerts]) fs.chmodSync(c.key, 0o600);

  const logTo = (k: 'a' | 'b' | 'plain') => (line: string) => serverLog[k].push(line);
  [pgA, pgB, pgPlain] = await Promise.all([
    preparePostgres({
      ssl: { certFile: certsA.cert, keyFile: certsA.key, caFile: clientCerts.caCert },
      hbaLines: ['hostssl all certuser 127.0.0.1/32 cert'],
      settings: { log_connections: true },
      log: logTo('a'),
    }),
    preparePostgres({ ssl: { certFile: certsB.cert, keyFile: certsB.key }, settings: { log_connections: true }, log: logTo('b') }),
    preparePostgres({ settings: { log_connections: true }, log: logTo('plain') }),
  ]);
  await pgA.query(`CREATE ROLE certuser LOGIN; CREATE TABLE marker AS SELECT 'A'::text AS name; GRANT SELECT ON marker TO PUBLIC`);
  await pgB.query(`CREATE TABLE marker AS SELECT 'B'::text AS name; GRANT SELECT ON marker TO PUBLIC`);

  fake = net.createServer((s) => {
    const got: Buffer[] = [];
    fakeReceived.push(got);
    fakeSockets.push(s);
    s.on('error', () => undefined);
    s.on('data', (d: Buffer) => {
      got.push(d);
      if (got.length === 1) {
        const answer = fakeAnswer;
        if (fakeDelayMs > 0) setTimeout(() => s.writable && s.write(answer), fakeDelayMs);
        else s.write(answer);
      }
    });
  });
  await new Promise<void>((r) => fake.listen(0, '127.0.0.1', () => r()));
  const fakePort = (fake.address() as net.AddressInfo).port;

  const target = (p: EmbeddedPostgres) => ({ host: p.host, port: p.port });
  const pass = await startGateway(pgA, {
    listen: { security: 'passthrough' },
    tls: { mode: 'disable' },
    passthrough: {
      gssenc: true,
      servers: {
        'a.db.test': target(pgA),
        // Same server under a name its certificate does not carry: verify-full must fail.
        'alias.db.test': target(pgA),
        'b.db.test': target(pgB),
        'n.db.test': target(pgPlain),
        'fake.db.test': { host: '127.0.0.1', port: fakePort },
      },
    },
  });
  gwPass = pass.gw;
  gwPassLogs = pass.logs;
  gwUnmatched = (await startGateway(pgB, { listen: { security: 'passthrough' }, passthrough: { unmatched: 'server', servers: { 'a.db.test': target(pgA) } } })).gw;
  gwPooled = (
    await startGateway(pgA, {
      tls: { mode: 'allow', cert_file: certsGw.cert, key_file: certsGw.key },
      passthrough: { servers: { 'a.db.test': target(pgA) } },
    })
  ).gw;
  gwPooledNoTls = (await startGateway(pgA, { passthrough: { servers: { 'a.db.test': target(pgA) } } })).gw;
});

after(async () => {
  await Promise.all([gwPass?.stop(1000), gwUnmatched?.stop(1000), gwPooled?.stop(1000), gwPooledNoTls?.stop(1000)]);
  for (const s of fakeSockets) s.destroy();
  await new Promise<void>((r) => (fake ? fake.close(() => r()) : r()));
  await Promise.all([pgA?.stop(), pgB?.stop(), pgPlain?.stop()]);
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

describe('passthrough: the client verifies the server itself', { timeout: 30_000 }, () => {
  test('psql verify-full against the server CA with channel_binding=require; trustgate holds no key', async () => {
    assert.equal(gwPass.config.tls.mode, 'disable');
    assert.equal(gwPass.config.tls.cert_file, undefined);
    assert.equal(gwPass.config.tls.key_file, undefined);

    const r = await psql(
      ci(portOf(gwPass), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert} channel_binding=require`),
      `select s.ssl, current_setting('port'), (select name from marker) from pg_stat_ssl s where s.pid = pg_backend_pid()`,
    );
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), `t|${pgA.port}|A`);
    const started = gwPassLogs.find((l) => l.msg === 'passthrough session started' && l.sni === 'a.db.test');
    assert.ok(started, 'gateway logged the passthrough session');
    assert.equal(started.negotiation, 'ssl');
  });

  test("verify-full against trustgate's own CA fails (the certificate is the server's)", async () => {
    const r = await psql(ci(portOf(gwPass), 'a.db.test', `sslmode=verify-full sslrootcert=${certsGw.caCert}`), 'select 1');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /certificate verify failed/);
  });

  test('verify-full with a host name the server certificate does not carry fails; verify-ca passes', async () => {
    const full = await psql(ci(portOf(gwPass), 'alias.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert}`), 'select 1');
    assert.notEqual(full.code, 0);
    assert.match(full.stderr, /server certificate for "a\.db\.test" does not match host name "alias\.db\.test"/);
    const ca = await psql(ci(portOf(gwPass), 'alias.db.test', `sslmode=verify-ca sslrootcert=${certsA.caCert}`), `select current_setting('port')`);
    assert.equal(ca.code, 0, ca.stderr);
    assert.equal(ca.stdout.trim(), String(pgA.port));
  });

  test('node-postgres with ssl.ca/servername and enableChannelBinding: SCRAM-SHA-256-PLUS end to end, server certificate', async () => {
    const c = new pg.Client({ connectionTimeoutMillis: 10_000, ...pgTlsConfig(portOf(gwPass), 'a.db.test', certsA.caCert), enableChannelBinding: true });
    c.on('error', () => undefined);
    const mechanisms: string[] = [];
    const con = (c as unknown as { connection: { sendSASLInitialResponseMessage(m: string, r: string): void } }).connection;
    const orig = con.sendSASLInitialResponseMessage.bind(con);
    con.sendSASLInitialResponseMessage = (m, resp) => {
      mechanisms.push(m);
      orig(m, resp);
    };
    await c.connect();
    try {
      assert.deepEqual(mechanisms, ['SCRAM-SHA-256-PLUS']);
      const stream = pgStream(c);
      assert.equal(stream.getPeerCertificate().fingerprint256, fingerprint(certsA.cert));
      assert.notEqual(stream.getPeerCertificate().fingerprint256, fingerprint(certsGw.cert));
      const res = await c.query(`select s.ssl, current_setting('port') as port from pg_stat_ssl s where s.pid = pg_backend_pid()`);
      assert.deepEqual(res.rows, [{ ssl: true, port: String(pgA.port) }]);
    } finally {
      await c.end();
    }
  });

  test('plain startup on the passthrough listener: FATAL 28000 from trustgate, nothing reaches a server', async () => {
    await serversUntouched(async () => {
      const r = await psql(ci(portOf(gwPass), 'a.db.test', 'sslmode=disable'), 'select 1');
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /accepts no unencrypted sessions/);
      const s = await tcpConnect(portOf(gwPass));
      s.write(startupMessage([['user', 'app'], ['database', 'postgres']]));
      const { bytes, closed } = await collectUntilClosed(s);
      assert.ok(closed);
      assert.equal(String.fromCharCode(bytes[0]), 'E');
      const f = errorFields({ type: 'E', bytes });
      assert.equal(f.C, '28000');
      assert.equal(f.S, 'FATAL');
    });
  });
});

describe('passthrough: client-certificate authentication end to end', { timeout: 30_000 }, () => {
  const conn = (extra: string) => ci(portOf(gwPass), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert} ${extra}`, 'certuser');

  test('psql with sslcert/sslkey logs in as certuser (hba cert)', async () => {
    const r = await psql(conn(`sslcert=${clientCerts.cert} sslkey=${clientCerts.key}`), `select current_user, s.client_dn from pg_stat_ssl s where s.pid = pg_backend_pid()`, '');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'certuser|/CN=certuser');
  });

  test('node-postgres with ssl.cert/ssl.key logs in as certuser', async () => {
    const c = await pgConnect({
      ...pgTlsConfig(portOf(gwPass), 'a.db.test', certsA.caCert),
      user: 'certuser',
      password: undefined,
      ssl: { ca: read(certsA.caCert), servername: 'a.db.test', rejectUnauthorized: true, cert: read(clientCerts.cert), key: read(clientCerts.key) },
    });
    try {
      const res = await c.query(`select current_user as u, s.client_dn as dn from pg_stat_ssl s where s.pid = pg_backend_pid()`);
      assert.deepEqual(res.rows, [{ u: 'certuser', dn: '/CN=certuser' }]);
    } finally {
      await c.end();
    }
  });

  test('without a client certificate PostgreSQL refuses (its own error text)', async () => {
    const r = await psql(conn(''), 'select 1', '');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /connection requires a valid client certificate/);
  });

  test('a client certificate from a CA PostgreSQL does not trust is rejected in the handshake', async () => {
    const r = await psql(conn(`sslcert=${rogueCerts.cert} sslkey=${rogueCerts.key}`), 'select 1', '');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /unknown ca|certificate verify failed/i);
  });
});

describe('passthrough: SNI routing to two servers', { timeout: 30_000 }, () => {
  test('a.db.test and b.db.test reach their own server, concurrently (psql and node-postgres)', async () => {
    const viaPsql = (name: string, ca: string) =>
      psql(ci(portOf(gwPass), name, `sslmode=verify-full sslrootcert=${ca}`), `select current_setting('port'), (select name from marker), (select true from pg_sleep(0.3))`);
    const viaPg = async (name: string, ca: string) => {
      const c = await pgConnect(pgTlsConfig(portOf(gwPass), name, ca));
      try {
        const r = await c.query(`select current_setting('port') as port, (select name from marker) as name, pg_sleep(0.3)`);
        return { ...r.rows[0], cert: pgStream(c).getPeerCertificate().fingerprint256 };
      } finally {
        await c.end();
      }
    };
    const bBefore = received().b;
    const t0 = Date.now();
    const [pa1, pb1, pa2, pb2, ga, gb] = await Promise.all([
      viaPsql('a.db.test', certsA.caCert),
      viaPsql('b.db.test', certsB.caCert),
      viaPsql('a.db.test', certsA.caCert),
      viaPsql('b.db.test', certsB.caCert),
      viaPg('a.db.test', certsA.caCert),
      viaPg('b.db.test', certsB.caCert),
    ]);
    for (const r of [pa1, pa2]) {
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), `${pgA.port}|A|t`);
    }
    assert.ok(received().b >= bBefore + 3, 'PostgreSQL B logged the connections routed to it');
    for (const r of [pb1, pb2]) {
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), `${pgB.port}|B|t`);
    }
    assert.deepEqual({ port: ga.port, name: ga.name, cert: ga.cert }, { port: String(pgA.port), name: 'A', cert: fingerprint(certsA.cert) });
    assert.deepEqual({ port: gb.port, name: gb.name, cert: gb.cert }, { port: String(pgB.port), name: 'B', cert: fingerprint(certsB.cert) });
    // Six sessions of 0.3 s each ran side by side, not one after another.
    assert.ok(Date.now() - t0 < 6 * 300 + 3000, `took ${Date.now() - t0} ms`);
  });

  test("b.db.test presents B's certificate: verifying it against A's CA fails", async () => {
    const r = await psql(ci(portOf(gwPass), 'b.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert}`), 'select 1');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /certificate verify failed/);
  });
});

describe('direct TLS (PostgreSQL 17+, ALPN postgresql)', { timeout: 30_000 }, () => {
  test('passthrough listener: the ClientHello goes straight to PostgreSQL, which negotiates ALPN and serves the session', async () => {
    const s = await tlsClient({ host: '127.0.0.1', port: portOf(gwPass), servername: 'a.db.test', ALPNProtocols: ['postgresql'], ca: read(certsA.caCert) });
    assert.equal(s.alpnProtocol, 'postgresql');
    assert.equal(s.getPeerCertificate().fingerprint256, fingerprint(certsA.cert));
    const conn = await scramLoginOver(s, 'app', USERS.app);
    const rows = await simpleQuery(conn, `select 1, s.ssl, current_setting('port') from pg_stat_ssl s where s.pid = pg_backend_pid()`);
    assert.deepEqual(rows, [['1', 't', String(pgA.port)]]);
    terminate(conn);
    const started = gwPassLogs.find((l) => l.msg === 'passthrough session started' && l.negotiation === 'direct');
    assert.ok(started, 'gateway logged a direct-TLS passthrough session');
  });

  test("node-postgres sslnegotiation 'direct' through passthrough reaches b.db.test", async () => {
    const c = await pgConnect({ ...pgTlsConfig(portOf(gwPass), 'b.db.test', certsB.caCert), sslnegotiation: 'direct' } as pg.ClientConfig);
    try {
      const r = await c.query(`select current_setting('port') as port, (select name from marker) as name`);
      assert.deepEqual(r.rows, [{ port: String(pgB.port), name: 'B' }]);
      assert.equal(pgStream(c).alpnProtocol, 'postgresql');
      assert.equal(pgStream(c).getPeerCertificate().fingerprint256, fingerprint(certsB.cert));
    } finally {
      await c.end();
    }
  });

  test("pooled listener: unrouted direct TLS is terminated by trustgate's own certificate; a.db.test still passes through", async () => {
    const own = await tlsClient({ host: '127.0.0.1', port: portOf(gwPooled), servername: 'localhost', ALPNProtocols: ['postgresql'], ca: read(certsGw.caCert) });
    assert.equal(own.alpnProtocol, 'postgresql');
    assert.equal(own.getPeerCertificate().fingerprint256, fingerprint(certsGw.cert));
    const conn = await scramLoginOver(own, 'app', USERS.app);
    // The pooled server connection is trustgate's own (plain, tls.mode disable towards PostgreSQL A).
    assert.deepEqual(await simpleQuery(conn, `select 1, current_setting('port')`), [['1', String(pgA.port)]]);
    terminate(conn);

    const routed = await tlsClient({ host: '127.0.0.1', port: portOf(gwPooled), servername: 'a.db.test', ALPNProtocols: ['postgresql'], ca: read(certsA.caCert) });
    assert.equal(routed.getPeerCertificate().fingerprint256, fingerprint(certsA.cert));
    const conn2 = await scramLoginOver(routed, 'app', USERS.app);
    assert.deepEqual(await simpleQuery(conn2, `select s.ssl from pg_stat_ssl s where s.pid = pg_backend_pid()`), [['t']]);
    terminate(conn2);
  });

  test('direct TLS without ALPN "postgresql" gets alert no_application_protocol, on both listeners, and no server sees it', async () => {
    await serversUntouched(async () => {
      for (const [port, name, ca] of [
        [portOf(gwPass), 'a.db.test', certsA.caCert],
        [portOf(gwPooled), 'localhost', certsGw.caCert],
      ] as const) {
        await assert.rejects(tlsClient({ host: '127.0.0.1', port, servername: name, ca: read(ca) }), /no application protocol/i);
        await assert.rejects(
          tlsClient({ host: '127.0.0.1', port, servername: name, ALPNProtocols: ['http/1.1'], ca: read(ca) }),
          /no application protocol/i,
        );
      }
    });
  });
});

describe('cancel through passthrough', { timeout: 60_000 }, () => {
  test('psql Ctrl-C (plain CancelRequest to trustgate) cancels the query on the server', async () => {
    const r = await interruptPsqlSleep(['-d', ci(portOf(gwPass), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert}`)], USERS.app, pgA);
    assert.match(r.stderr, /canceling statement due to user request/);
    assert.ok(r.cancelMs < 3000, `cancel took ${r.cancelMs} ms`);
    const logged = gwPassLogs.filter((l) => l.msg === 'cancel request');
    assert.ok(logged.some((l) => l.matched === false && (l.forwarded as number) >= 1), 'cancel was forwarded to the passthrough server');
  });

  test('node-postgres Client#cancel (plain CancelRequest) cancels the query', async () => {
    const config = pgTlsConfig(portOf(gwPass), 'a.db.test', certsA.caCert);
    const c = await pgConnect(config);
    try {
      const pending = c.query('select pg_sleep(30) /* pg-cancel */').then(
        () => null,
        (e: Error & { code?: string }) => e,
      );
      await waitActive(pgA, '%pg-cancel%');
      const plainCancels = () => gwPassLogs.filter((l) => l.msg === 'cancel request' && l.matched === false && (l.forwarded as number) >= 1).length;
      const plainBefore = plainCancels();
      const t0 = Date.now();
      // Client#cancel(client, query) is what pg.Pool / pg-cursor use; it is not in @types/pg.
      const canceller = new pg.Client(config) as unknown as {
        connection: NodeJS.EventEmitter;
        cancel(client: pg.Client, query: unknown): void;
      };
      canceller.connection.on('error', () => undefined);
      canceller.cancel(c, (c as unknown as { _getActiveQuery?: () => unknown; activeQuery: unknown })._getActiveQuery?.() ?? (c as unknown as { activeQuery: unknown }).activeQuery);
      const err = await pending;
      assert.ok(err, 'query was not cancelled');
      assert.equal(err.code, '57014');
      assert.match(err.message, /canceling statement due to user request/);
      assert.ok(Date.now() - t0 < 3000);
      // node-postgres sends its CancelRequest in plain (no SSLRequest) to trustgate, which forwards it.
      assert.equal(plainCancels(), plainBefore + 1);
      const after = await c.query('select 1 as one');
      assert.deepEqual(after.rows, [{ one: 1 }]);
    } finally {
      await c.end();
    }
  });

  test('postgres.js query.cancel() (CancelRequest inside TLS, routed by SNI) cancels the query', async () => {
    const sql = postgres({
      host: '127.0.0.1',
      port: portOf(gwPass),
      user: 'app',
      password: USERS.app,
      database: 'postgres',
      ssl: { ca: read(certsA.caCert), servername: 'a.db.test', rejectUnauthorized: true },
      max: 1,
      connect_timeout: 5,
      onnotice: () => undefined,
    });
    try {
      await sql`select 1`;
      const q = sql`select pg_sleep(30) /* pgjs-cancel */`;
      const pending = q.then(
        () => null,
        (e: Error & { code?: string }) => e,
      );
      await waitActive(pgA, '%pgjs-cancel%');
      const sessions = () => gwPassLogs.filter((l) => l.msg === 'passthrough session started' && l.sni === 'a.db.test').length;
      const plainCancels = () => gwPassLogs.filter((l) => l.msg === 'cancel request').length;
      const [sessionsBefore, plainBefore] = [sessions(), plainCancels()];
      const t0 = Date.now();
      await q.cancel();
      const err = await pending;
      assert.ok(err, 'query was not cancelled');
      assert.equal(err.code, '57014');
      assert.ok(Date.now() - t0 < 3000);
      // The cancel came as a new TLS connection (SNI a.db.test) passed through to PostgreSQL A,
      // not as a plain CancelRequest to trustgate.
      assert.equal(sessions(), sessionsBefore + 1);
      assert.equal(plainCancels(), plainBefore);
      const again = await sql`select 1 as one`;
      assert.equal(again[0].one, 1);
    } finally {
      await sql.end({ timeout: 2 });
    }
  });
});

async function waitActive(server: EmbeddedPostgres, like: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const rows = await server.query(`select 1 from pg_stat_activity where query like $1 and state = 'active' and pid <> pg_backend_pid()`, [like]);
    if (rows.length > 0) return;
    await sleep(25);
  }
  throw new Error(`query ${like} never became active`);
}

describe('passthrough: bad input is refused, nothing forwarded, other clients unaffected', { timeout: 60_000 }, () => {
  let keeper: pg.Client;
  let keeperPid: number;
  let slowHelloReply: Buffer | undefined;

  before(async () => {
    keeper = await pgConnect(pgTlsConfig(portOf(gwPass), 'a.db.test', certsA.caCert));
    keeperPid = (await keeper.query('select pg_backend_pid() as pid')).rows[0].pid;
  });
  after(() => keeper?.end());

  /** Runs `fn` while the keeper (another passthrough client) has a query running; it must not notice. */
  async function withKeeper(fn: () => Promise<void>): Promise<void> {
    const running = keeper.query(`select pg_backend_pid() as pid, (select true from pg_sleep(0.4)) as slept`);
    await fn();
    const r = await running;
    assert.deepEqual(r.rows, [{ pid: keeperPid, slept: true }]);
    assert.deepEqual((await keeper.query('select 2 as two')).rows, [{ two: 2 }]);
  }

  test('unknown SNI: alert unrecognized_name, no server contacted', async () => {
    await withKeeper(() =>
      serversUntouched(async () => {
        const r = await psql(ci(portOf(gwPass), 'zzz.db.test', 'sslmode=require'), 'select 1');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /unrecognized name/);
        // sslmode=prefer retries without TLS after the alert: the passthrough listener refuses that too.
        const p = await psql(ci(portOf(gwPass), 'zzz.db.test', 'sslmode=prefer'), 'select 1');
        assert.notEqual(p.code, 0);
        assert.match(p.stderr, /accepts no unencrypted sessions/);
      }),
    );
    assert.ok(gwPassLogs.some((l) => l.msg === 'connection refused during TLS negotiation' && /zzz\.db\.test/.test(String(l.reason))));
  });

  test('missing SNI (host given as an IP address) with unmatched=refuse: alert unrecognized_name', async () => {
    await withKeeper(() =>
      serversUntouched(async () => {
        const r = await psql(`host=127.0.0.1 port=${portOf(gwPass)} user=app dbname=postgres sslmode=require connect_timeout=5`, 'select 1');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /unrecognized name/);
      }),
    );
  });

  test('unmatched=server: missing or unknown SNI goes to `server` (PostgreSQL B), listed names still route', async () => {
    const noSni = await psql(
      `host=127.0.0.1 port=${portOf(gwUnmatched)} user=app dbname=postgres sslmode=verify-ca sslrootcert=${certsB.caCert} connect_timeout=5`,
      `select current_setting('port'), (select name from marker)`,
    );
    assert.equal(noSni.code, 0, noSni.stderr);
    assert.equal(noSni.stdout.trim(), `${pgB.port}|B`);
    const unknown = await psql(ci(portOf(gwUnmatched), 'zzz.db.test', `sslmode=verify-ca sslrootcert=${certsB.caCert}`), `select (select name from marker)`);
    assert.equal(unknown.code, 0, unknown.stderr);
    assert.equal(unknown.stdout.trim(), 'B');
    const listed = await psql(ci(portOf(gwUnmatched), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert}`), `select (select name from marker)`);
    assert.equal(listed.code, 0, listed.stderr);
    assert.equal(listed.stdout.trim(), 'A');
  });

  test('target server answers N (PostgreSQL without ssl): TLS alert, closed, the server got no startup', async () => {
    const authorizedBefore = countLines(serverLog.plain, 'connection authorized');
    const receivedBefore = received().plain;
    await withKeeper(async () => {
      const r = await psql(ci(portOf(gwPass), 'n.db.test', 'sslmode=require'), 'select 1');
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /internal error/);
    });
    await sleep(200);
    assert.equal(received().plain, receivedBefore + 1, 'trustgate opened exactly one connection to the plain server');
    assert.equal(countLines(serverLog.plain, 'connection authorized'), authorizedBefore, 'no session was started on the plain server');
  });

  test('target answers N, or S with extra bytes: the server receives exactly one SSLRequest and nothing else', async () => {
    for (const answer of [Buffer.from('N'), Buffer.from('SXYZ')]) {
      fakeAnswer = answer;
      const n = fakeReceived.length;
      await withKeeper(async () => {
        const r = await psql(ci(portOf(gwPass), 'fake.db.test', 'sslmode=require'), 'select 1');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /internal error/, `answer ${answer}`);
      });
      await sleep(100);
      assert.equal(fakeReceived.length, n + 1);
      assert.deepEqual(Buffer.concat(fakeReceived[n]), sslRequest(), `answer ${answer}: the server got only the SSLRequest`);
    }
  });

  test('a client that vanishes while trustgate opens the server session leaves no session or server connection behind', async () => {
    fakeAnswer = Buffer.from('S');
    fakeDelayMs = 300;
    try {
      for (const how of ['reset', 'fin'] as const) {
        const n = fakeSockets.length;
        const raw = await tcpConnect(portOf(gwPass));
        raw.write(sslRequest());
        assert.equal((await readBytes(raw, 1)).toString(), 'S');
        // A real ClientHello naming the fake server; the client gives up before the server answers.
        const hello = tls.connect({ socket: raw, servername: 'fake.db.test', rejectUnauthorized: false });
        hello.on('error', () => undefined);
        for (let i = 0; i < 100 && fakeSockets.length === n; i++) await sleep(10);
        assert.equal(fakeSockets.length, n + 1, 'trustgate connected to the fake server');
        if (how === 'reset') raw.resetAndDestroy();
        else raw.destroy();
        hello.destroy();
        const server = fakeSockets[n];
        let closed = server.destroyed || server.readyState === 'closed';
        for (let i = 0; i < 200 && !closed; i++) {
          await sleep(10);
          closed = server.destroyed || server.readyState === 'closed';
        }
        assert.ok(closed, `${how}: the server connection was closed`);
        const rows = gwPass.showClients().rows.filter((r) => String(r[7]).includes('fake.db.test'));
        assert.deepEqual(rows, [], `${how}: no passthrough session left`);
      }
    } finally {
      fakeDelayMs = 0;
    }
  });

  test("non-TLS bytes after 'S' (plain startup, HTTP): closed with nothing sent back, no server contacted", async () => {
    await withKeeper(() =>
      serversUntouched(async () => {
        for (const payload of [startupMessage([['user', 'app'], ['database', 'postgres']]), Buffer.from('GET / HTTP/1.1\r\nHost: a.db.test\r\n\r\n')]) {
          const s = await tcpConnect(portOf(gwPass));
          s.write(sslRequest());
          assert.equal((await readBytes(s, 1)).toString(), 'S');
          s.write(payload);
          const { bytes, closed } = await collectUntilClosed(s);
          assert.ok(closed, 'connection closed');
          assert.equal(bytes.length, 0, `nothing sent back, got ${bytes.toString('hex')}`);
        }
        // Direct TLS that turns out not to be a ClientHello (a handshake record holding a ServerHello).
        const s = await tcpConnect(portOf(gwPass));
        s.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x06, 0x02, 0x00, 0x00, 0x02, 0x03, 0x03]));
        const { bytes, closed } = await collectUntilClosed(s);
        assert.ok(closed, 'connection closed');
        assert.equal(bytes.length, 0);
      }),
    );
  });

  test('a ClientHello that never completes is cut off by the startup timeout; no server contacted', async () => {
    const { gw } = await startGateway(pgA, {
      listen: { security: 'passthrough' },
      limits: { startup_timeout_ms: 500 },
      passthrough: { servers: { 'a.db.test': { host: pgA.host, port: pgA.port } } },
    });
    try {
      await serversUntouched(async () => {
        const s = await tcpConnect(portOf(gw));
        s.write(sslRequest());
        assert.equal((await readBytes(s, 1)).toString(), 'S');
        s.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00]));
        const t0 = Date.now();
        const { bytes, closed } = await collectUntilClosed(s, 5000);
        assert.ok(closed, 'connection closed');
        assert.ok(Date.now() - t0 < 3000, `closed after ${Date.now() - t0} ms`);
        slowHelloReply = bytes;
      });
    } finally {
      await gw.stop(500);
    }
  });

  test(
    'the startup timeout writes nothing in plain into a connection that already started TLS',
    () => {
      assert.ok(slowHelloReply, 'the previous test ran');
      assert.equal(slowHelloReply.length, 0, `gateway sent: ${JSON.stringify(slowHelloReply.toString('latin1'))}`);
    },
  );

  test('bytes pipelined after SSLRequest (or GSSENCRequest): FATAL 08P01 in plain, no S, closed, no server contacted', async () => {
    await withKeeper(() =>
      serversUntouched(async () => {
        for (const [request, message] of [
          [sslRequest(), /unencrypted data after SSL request/],
          [gssencRequest(), /unencrypted data after GSSAPI encryption request/],
        ] as const) {
          const s = await tcpConnect(portOf(gwPass));
          s.write(Buffer.concat([request, startupMessage([['user', 'app'], ['database', 'postgres']])]));
          const { bytes, closed } = await collectUntilClosed(s);
          assert.ok(closed);
          assert.equal(String.fromCharCode(bytes[0]), 'E', `got ${bytes.subarray(0, 16).toString('hex')}`);
          const f = errorFields({ type: 'E', bytes });
          assert.equal(f.C, '08P01');
          assert.match(f.M, message);
        }
      }),
    );
  });

  test('oversized ClientHello, and a truncated one followed by EOF: closed, nothing sent, no server contacted', async () => {
    await withKeeper(() =>
      serversUntouched(async () => {
        // One full 16 KiB record announcing a 64 KiB ClientHello: more than the gateway reads.
        const record = Buffer.alloc(5 + 16_384, 0x41);
        record.set([0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x01, 0x00, 0x00, 0x03, 0x03]);
        const big = await tcpConnect(portOf(gwPass));
        big.write(sslRequest());
        assert.equal((await readBytes(big, 1)).toString(), 'S');
        big.write(record);
        const r1 = await collectUntilClosed(big);
        assert.ok(r1.closed, 'oversized ClientHello: connection closed');
        assert.equal(r1.bytes.length, 0);

        // Direct TLS too: a record header claiming more than the TLS maximum.
        const direct = await tcpConnect(portOf(gwPass));
        direct.write(Buffer.from([0x16, 0x03, 0x01, 0x40, 0x01, 0x01, 0x00, 0x40, 0x00]));
        const r2 = await collectUntilClosed(direct);
        assert.ok(r2.closed, 'oversized direct-TLS record: connection closed');
        assert.equal(r2.bytes.length, 0);

        const cut = await tcpConnect(portOf(gwPass));
        cut.write(sslRequest());
        assert.equal((await readBytes(cut, 1)).toString(), 'S');
        cut.end(Buffer.from([0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03, ...Buffer.alloc(20, 7)]));
        const r3 = await collectUntilClosed(cut);
        assert.ok(r3.closed, 'truncated ClientHello + EOF: connection closed');
        assert.equal(r3.bytes.length, 0);
      }),
    );
  });

  test("GSSENCRequest (gssenc: true) is relayed: the server's N reaches the client, which then does TLS with the server end to end", async () => {
    await withKeeper(async () => {
      const raw = await tcpConnect(portOf(gwPass));
      raw.write(gssencRequest());
      assert.equal((await readBytes(raw, 1)).toString(), 'N', 'PostgreSQL (built without GSSAPI) answered N');
      raw.write(sslRequest());
      assert.equal((await readBytes(raw, 1)).toString(), 'S', 'the SSLRequest went to PostgreSQL A, spliced');
      const s = await tlsClient({ socket: raw, servername: 'a.db.test', ca: read(certsA.caCert) });
      assert.equal(s.getPeerCertificate().fingerprint256, fingerprint(certsA.cert));
      const conn = await scramLoginOver(s, 'app', USERS.app);
      assert.deepEqual(await simpleQuery(conn, `select s.ssl, current_setting('port') from pg_stat_ssl s where s.pid = pg_backend_pid()`), [['t', String(pgA.port)]]);
      terminate(conn);
    });
    assert.ok(gwPassLogs.some((l) => l.msg === 'passthrough session started' && l.negotiation === 'gssenc'));
  });

  test('after all of it, a new passthrough client still works', async () => {
    const r = await psql(ci(portOf(gwPass), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert} channel_binding=require`), 'select 42');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '42');
  });
});

describe('pooled listener with passthrough routes', { timeout: 30_000 }, () => {
  test('trustgate with TLS: a listed name passes through, any other name gets trustgate\'s own certificate', async () => {
    const routed = await psql(
      ci(portOf(gwPooled), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert} channel_binding=require`),
      `select s.ssl from pg_stat_ssl s where s.pid = pg_backend_pid()`,
    );
    assert.equal(routed.code, 0, routed.stderr);
    assert.equal(routed.stdout.trim(), 't');
    // Terminated by trustgate: the pooled server connection behind it is trustgate's own, in plain.
    const own = await psql(ci(portOf(gwPooled), 'localhost', `sslmode=verify-full sslrootcert=${certsGw.caCert}`), `select s.ssl from pg_stat_ssl s where s.pid = pg_backend_pid()`);
    assert.equal(own.code, 0, own.stderr);
    assert.equal(own.stdout.trim(), 'f');
  });

  test('trustgate without TLS: a listed name passes through; an unlisted one gets alert unrecognized_name (sslmode=prefer then falls back to plain)', async () => {
    const routed = await psql(ci(portOf(gwPooledNoTls), 'a.db.test', `sslmode=verify-full sslrootcert=${certsA.caCert}`), `select s.ssl from pg_stat_ssl s where s.pid = pg_backend_pid()`);
    assert.equal(routed.code, 0, routed.stderr);
    assert.equal(routed.stdout.trim(), 't');
    await serversUntouched(async () => {
      const r = await psql(ci(portOf(gwPooledNoTls), 'zzz.db.test', 'sslmode=require'), 'select 1');
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /unrecognized name/);
    });
    const prefer = await psql(ci(portOf(gwPooledNoTls), 'zzz.db.test', 'sslmode=prefer'), 'select 7');
    assert.equal(prefer.code, 0, prefer.stderr);
    assert.equal(prefer.stdout.trim(), '7');
  });
});

describe('admin console', { timeout: 30_000 }, () => {
  test('SHOW CLIENTS lists a live passthrough session, and forgets it when it ends', async () => {
    const admin = await pgConnect({ host: '127.0.0.1', port: portOf(gwPooled), user: 'app', password: USERS.app, database: 'trustgate' });
    const session = await pgConnect(pgTlsConfig(portOf(gwPooled), 'a.db.test', certsA.caCert));
    try {
      assert.equal(pgStream(session).getPeerCertificate().fingerprint256, fingerprint(certsA.cert));
      const target = `${pgA.host}:${pgA.port} (a.db.test)`;
      const rows = (await admin.query('SHOW CLIENTS')).rows as Record<string, unknown>[];
      const mine = rows.filter((r) => r.server === target);
      assert.equal(mine.length, 1, JSON.stringify(rows));
      assert.equal(mine[0].state, 'passthrough spliced');
      assert.ok(['t', 'true'].includes(String(mine[0].tls)), `tls column: ${mine[0].tls}`);
      assert.match(String(mine[0].addr), /^127\.0\.0\.1:\d+$/);
      // The admin client itself is listed as an ordinary session.
      assert.ok(rows.some((r) => r.database === 'trustgate' && r.user === 'app'));

      await session.end();
      let left = mine.length;
      for (let i = 0; i < 40 && left > 0; i++) {
        await sleep(50);
        left = ((await admin.query('SHOW CLIENTS')).rows as Record<string, unknown>[]).filter((r) => r.server === target).length;
      }
      assert.equal(left, 0, 'the ended passthrough session is no longer listed');
    } finally {
      await session.end().catch(() => undefined);
      await admin.end();
    }
  });
});
