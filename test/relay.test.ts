/**
 * Auth relay (issue 5, part 1; docs/security-modes.md): PostgreSQL authenticates the client
 * through trustgate, which holds no password, hash or key. Real clients (psql, node-postgres,
 * postgres.js, raw sockets) against a real PostgreSQL holding SCRAM, md5 and cleartext-checked
 * roles; both `relay.after_auth` modes; channel binding; the security-session callback
 * (observe, refuse, transform, answer itself, async); cancel; pool reuse; bad input.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Writable } from 'node:stream';
import pg from 'pg';
import postgres from 'postgres';
import { preparePostgres, USERS } from './helpers/stack.js';
import { findFreePort, type EmbeddedPostgres } from './helpers/postgres.js';
import { interruptPsqlSleep, run, type RunResult } from './helpers/psql.js';
import { RawConnection, errorFields, type BackendMessage } from './helpers/raw-client.js';
import { createGateway, type Gateway } from '../src/gateway.js';
import { createLogger } from '../src/log/logger.js';
import { mergeConfig } from '../src/config/load.js';
import type { ConfigInput } from '../src/config/schema.js';
import { generateCertificates, type GeneratedCertificates } from '../src/tls/context.js';
import { passwordMessage, queryMessage, saslInitialResponse, saslResponse, startupMessage } from '../src/protocol/frontend.js';
import { ScramClientExchange, SCRAM_SHA_256 } from '../src/auth/scram.js';
import {
  authenticationSaslMessage,
  forwardSecurityMessage,
  saslMechanismOf,
  SecuritySessionRefusal,
  type SecuritySessionCallback,
  type SecuritySessionInfo,
} from '../src/relay/security-session.js';

const MD5_USER = 'md5user';
const MD5_PW = 'md5-secret';
const CLEAR_USER = 'pwuser';
const CLEAR_PW = 'clear-secret';
/** Every role this file logs in with: name → password (the gateway never sees this table). */
const PASSWORDS: Record<string, string> = { ...USERS, [MD5_USER]: MD5_PW, [CLEAR_USER]: CLEAR_PW };
/** How PostgreSQL reports the method it used (system_user = auth_method:identity). */
const LOGINS = [
  { user: 'app', method: 'scram-sha-256' },
  { user: MD5_USER, method: 'md5' },
  { user: CLEAR_USER, method: 'password' },
] as const;
const AFTER_AUTH = ['forward', 'pool'] as const;
type AfterAuth = (typeof AFTER_AUTH)[number];

// ---------------------------------------------------------------- gateway

interface RelayGateway {
  gw: Gateway;
  port: number;
  logs: Record<string, unknown>[];
  stop(): Promise<void>;
}

/**
 * A gateway with no `auth.user`, no `auth.users_file`, nothing to authenticate anyone with: every
 * non-admin client is relayed (`listen.security: relay`). The security-session callback is
 * `hook.current` at the time of each call (tests swap it), forwarding when null.
 */
async function startRelayGateway(server: EmbeddedPostgres, config: Record<string, unknown>, hook?: { current: SecuritySessionCallback | null }): Promise<RelayGateway> {
  const logs: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      for (const line of String(chunk).split('\n')) if (line) logs.push(JSON.parse(line));
      cb();
    },
  });
  const base = {
    listen: { host: '127.0.0.1', port: 0, security: 'relay' },
    server: { host: server.host, port: server.port, tls: { mode: 'disable' } },
    pool: { mode: 'transaction', default_size: 4, wait_timeout_ms: 5000 },
    log: { level: 'info' },
  };
  const securitySession: SecuritySessionCallback = (m, c, i) => (hook?.current ?? forwardSecurityMessage)(m, c, i);
  const gw = createGateway(mergeConfig(base, config) as ConfigInput, { logger: createLogger('info', sink), securitySession });
  await gw.start();
  return { gw, port: gw.address().port, logs, stop: () => gw.stop(1000) };
}

// ---------------------------------------------------------------- clients

function conninfo(port: number, user: string, extra = '', database = 'postgres'): string {
  return `host=127.0.0.1 port=${port} user=${user} dbname=${database} ${extra}`.trim();
}

/** psql -At -c sql, asynchronously (the gateway runs in this process). */
function psql(info: string, sql: string, password: string): Promise<RunResult> {
  return run('psql', ['-X', '-A', '-t', '-d', info, '-c', sql], { PGPASSWORD: password }, 20_000);
}

type PgError = Error & { code?: string; severity?: string; routine?: string; file?: string; detail?: string };

async function pgConnect(config: pg.ClientConfig): Promise<pg.Client> {
  const c = new pg.Client({ host: '127.0.0.1', database: 'postgres', connectionTimeoutMillis: 10_000, ...config });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

async function pgConnectError(config: pg.ClientConfig): Promise<PgError> {
  const c = new pg.Client({ host: '127.0.0.1', database: 'postgres', connectionTimeoutMillis: 10_000, ...config });
  c.on('error', () => undefined);
  try {
    await c.connect();
  } catch (err) {
    return err as PgError;
  } finally {
    await c.end().catch(() => undefined);
  }
  throw new Error('connection unexpectedly succeeded');
}

async function pgOne<T = unknown>(config: pg.ClientConfig, sql: string): Promise<Record<string, T>> {
  const c = await pgConnect(config);
  try {
    return (await c.query(sql)).rows[0];
  } finally {
    await c.end();
  }
}

/** Startup packet sent, first authentication request read. */
async function rawStart(port: number, user: string, params: Record<string, string> = {}, protocolMinor = 0): Promise<{ conn: RawConnection; first: BackendMessage; pre: BackendMessage[] }> {
  const conn = await RawConnection.connect(port);
  conn.write(startupMessage([['user', user], ['database', 'postgres'], ...Object.entries(params)], (3 << 16) | protocolMinor));
  const pre: BackendMessage[] = [];
  let first = await conn.next(5000);
  while (first.type === 'v') {
    pre.push(first);
    first = await conn.next(5000);
  }
  return { conn, first, pre };
}

function authCode(m: BackendMessage): number {
  assert.equal(m.type, 'R', `expected an Authentication message, got '${m.type}' ${m.type === 'E' ? JSON.stringify(errorFields(m)) : ''}`);
  return m.bytes.readInt32BE(5);
}

function saslMechanisms(m: BackendMessage): string[] {
  assert.equal(authCode(m), 10);
  return m.bytes.toString('utf8', 9).split('\0').filter(Boolean);
}

/** SCRAM-SHA-256 by hand after AuthenticationSASL, up to ReadyForQuery; returns the messages after AuthenticationOk. */
async function rawScram(conn: RawConnection, password: string, pipelined?: Buffer): Promise<BackendMessage[]> {
  const scram = new ScramClientExchange({ password });
  conn.write(saslInitialResponse(SCRAM_SHA_256, scram.clientFirst()));
  const cont = await conn.next(5000);
  assert.equal(authCode(cont), 11);
  const final = saslResponse(scram.handleServerFirst(cont.bytes.toString('utf8', 9)));
  conn.write(pipelined ? Buffer.concat([final, pipelined]) : final);
  const fin = await conn.next(5000);
  assert.equal(authCode(fin), 12);
  scram.verifyServerFinal(fin.bytes.toString('utf8', 9));
  assert.equal(authCode(await conn.next(5000)), 0);
  return conn.until('Z', 5000);
}

// ---------------------------------------------------------------- server side

/**
 * A login role authenticated by `method`: md5 (its secret is an md5 hash), password (cleartext
 * on the wire, checked by PostgreSQL against its SCRAM verifier) or scram-sha-256. Tests that
 * count backends use a role of their own.
 */
async function createRole(server: EmbeddedPostgres, name: string, password: string, method: 'scram-sha-256' | 'md5' | 'password' = 'scram-sha-256'): Promise<void> {
  const encryption = method === 'md5' ? 'md5' : 'scram-sha-256';
  const group = method === 'md5' ? ' IN ROLE md5_users' : method === 'password' ? ' IN ROLE clear_users' : '';
  await server.query(`SET password_encryption = '${encryption}'; CREATE ROLE ${name} LOGIN PASSWORD '${password}'${group}`);
  PASSWORDS[name] = password;
}

/**
 * Client backends of `user`, plus backends still authenticating (PostgreSQL 18 lists those with
 * state 'starting' and no user name yet).
 */
async function backends(server: EmbeddedPostgres, user: string): Promise<number> {
  const rows = await server.query<{ n: number }>(
    `select count(*)::int as n from pg_stat_activity
      where backend_type = 'client backend' and pid <> pg_backend_pid() and (usename = $1 or state = 'starting')`,
    [user],
  );
  return rows[0].n;
}

/** Polls until `user` has `want` backends (or fewer); returns the last count. */
async function waitBackends(server: EmbeddedPostgres, user: string, want = 0, timeoutMs = 2000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const n = await backends(server, user);
    if (n <= want || Date.now() > deadline) return n;
    await sleep(50);
  }
}

async function waitActive(server: EmbeddedPostgres, sqlText: string): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const rows = await server.query<{ pid: number }>(`select pid from pg_stat_activity where query = $1 and state = 'active'`, [sqlText]);
    if (rows.length > 0) return rows[0].pid;
    await sleep(25);
  }
  throw new Error(`query never became active: ${sqlText}`);
}

const SLEEP_SQL = 'select pg_sleep(30)';

/** node-postgres: `select pg_sleep(30)` cancelled with pg's own (undocumented) Client#cancel(client, query). */
async function pgCancelSleep(client: pg.Client, config: pg.ClientConfig, server: EmbeddedPostgres): Promise<{ err: PgError | null; ms: number }> {
  const q = new pg.Query(SLEEP_SQL);
  const done = new Promise<PgError | null>((resolve) => {
    q.on('error', (e: Error) => resolve(e as PgError));
    q.on('end', () => resolve(null));
  });
  client.query(q);
  await waitActive(server, SLEEP_SQL);
  const started = Date.now();
  // A fresh Client aimed at the gateway sends the CancelRequest with `client`'s BackendKeyData.
  (new pg.Client({ host: '127.0.0.1', ...config }) as unknown as { cancel(c: pg.Client, q: pg.Query): void }).cancel(client, q);
  const err = await done;
  return { err, ms: Date.now() - started };
}

/** postgres.js: `select pg_sleep(30)` cancelled with query.cancel(). */
async function postgresJsCancelSleep(port: number, user: string, password: string, server: EmbeddedPostgres): Promise<{ err: PgError | null; ms: number }> {
  const sql = postgres({ host: '127.0.0.1', port, user, password, database: 'postgres', max: 1, connect_timeout: 5, onnotice: () => undefined });
  try {
    const q = sql.unsafe(SLEEP_SQL);
    const done = q.then(
      () => null,
      (e: PgError) => e,
    );
    await waitActive(server, SLEEP_SQL);
    const started = Date.now();
    q.cancel();
    const err = await done;
    return { err, ms: Date.now() - started };
  } finally {
    await sql.end({ timeout: 1 });
  }
}

/** psql at a terminal: pg_sleep(30), then Ctrl-C. */
async function psqlCancelSleep(port: number, user: string, password: string, server: EmbeddedPostgres): Promise<void> {
  const r = await interruptPsqlSleep(['-h', '127.0.0.1', '-p', String(port), '-U', user, '-d', 'postgres'], password, server);
  assert.match(r.stderr, /canceling statement due to user request/);
  assert.ok(r.cancelMs < 3000, `psql cancel took ${r.cancelMs} ms`);
}

function assertCancelled(r: { err: PgError | null; ms: number }, who: string): void {
  assert.ok(r.err, `${who}: the query was not cancelled`);
  assert.equal(r.err.code, '57014', `${who}: ${r.err.message}`);
  assert.ok(r.ms < 3000, `${who}: cancel took ${r.ms} ms`);
}

// ================================================================ tests

describe('auth relay: PostgreSQL authenticates, trustgate holds no secret', () => {
  let server: EmbeddedPostgres;
  let dir: string;
  let pgCerts: GeneratedCertificates;
  let gwCerts: GeneratedCertificates;
  const hook: { current: SecuritySessionCallback | null } = { current: null };
  const gateways = {} as Record<AfterAuth, RelayGateway>;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'trustgate-relay-'));
    pgCerts = generateCertificates(dir, ['localhost', '127.0.0.1'], 'pg');
    gwCerts = generateCertificates(dir, ['localhost', '127.0.0.1'], 'gateway');
    server = await preparePostgres({
      ssl: { certFile: pgCerts.cert, keyFile: pgCerts.key, caFile: pgCerts.caCert },
      // Members of md5_users log in with md5, members of clear_users with a cleartext password; others SCRAM.
      hbaLines: ['host all +md5_users 127.0.0.1/32 md5', 'host all +clear_users 127.0.0.1/32 password'],
    });
    await server.query('CREATE ROLE md5_users NOLOGIN; CREATE ROLE clear_users NOLOGIN');
    await createRole(server, MD5_USER, MD5_PW, 'md5');
    await createRole(server, CLEAR_USER, CLEAR_PW, 'password');
    const secrets = await server.query<{ rolname: string; kind: string }>(
      `select rolname, left(rolpassword, 5) as kind from pg_authid where rolname in ('${MD5_USER}', '${CLEAR_USER}') order by rolname`,
    );
    assert.deepEqual(
      secrets.map((r) => `${r.rolname}:${r.kind.slice(0, 3)}`),
      [`${MD5_USER}:md5`, `${CLEAR_USER}:SCR`],
    );
    gateways.forward = await startRelayGateway(server, { relay: { after_auth: 'forward' } }, hook);
    gateways.pool = await startRelayGateway(server, { relay: { after_auth: 'pool' } }, hook);
  });

  after(async () => {
    for (const g of Object.values(gateways)) await g.stop();
    await server?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  // ------------------------------------------------------------ 1. no secret, methods, errors

  test('the gateway config holds no secret: no auth.user, no users file', () => {
    for (const mode of AFTER_AUTH) {
      const cfg = gateways[mode].gw.config;
      assert.equal(cfg.auth.user, undefined);
      assert.equal(cfg.auth.users_file, undefined);
      assert.equal(cfg.listen.security, 'relay');
      assert.equal(cfg.relay.after_auth, mode);
    }
  });

  test('route precedence: user over database over listener', async () => {
    await createRole(server, 'routed_pooled', 'routed-pw');
    // Listener pooled, database postgres relayed, one user pooled again; trust lets pooled users in
    // to show that the gateway then has nothing to log in to PostgreSQL with.
    const g = await startRelayGateway(server, {
      listen: { security: 'pooled' },
      auth: { method: 'trust' },
      pool: { wait_timeout_ms: 300 },
      databases: { postgres: { security: 'relay' } },
      users: { routed_pooled: { security: 'pooled' } },
    });
    try {
      const relayed = await pgOne<string>({ port: g.port, user: 'app', password: USERS.app }, 'select system_user as s');
      assert.equal(relayed.s, 'scram-sha-256:app');
      const pooledUser = await pgConnectError({ port: g.port, user: 'routed_pooled', password: 'routed-pw' });
      assert.match(pooledUser.message, /the gateway holds no SCRAM keys/);
      const pooledDb = await pgConnectError({ port: g.port, user: 'app', password: USERS.app, database: 'template1' });
      assert.match(pooledDb.message, /the gateway holds no SCRAM keys/);
    } finally {
      await g.stop();
    }
  });

  for (const mode of AFTER_AUTH) {
    test(`${mode}: SCRAM, md5 and cleartext password logins, psql and node-postgres; PostgreSQL did the authentication`, async () => {
      const { port } = gateways[mode];
      for (const { user, method } of LOGINS) {
        const r = await psql(conninfo(port, user, 'sslmode=disable'), 'select current_user, system_user', PASSWORDS[user]);
        assert.equal(r.code, 0, `${user}: ${r.stderr}`);
        assert.equal(r.stdout.trim(), `${user}|${method}:${user}`);
        const row = await pgOne<string>({ port, user, password: PASSWORDS[user] }, 'select current_user as u, system_user as s');
        assert.deepEqual({ ...row }, { u: user, s: `${method}:${user}` });
      }
    });

    test(`${mode}: a wrong password gets PostgreSQL's own FATAL 28P01, unchanged`, async () => {
      const { port } = gateways[mode];
      for (const { user } of LOGINS) {
        const r = await psql(conninfo(port, user, 'sslmode=disable'), 'select 1', 'wrong-password');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, new RegExp(`FATAL:  password authentication failed for user "${user}"`));
        const e = await pgConnectError({ port, user, password: 'wrong-password' });
        assert.equal(e.code, '28P01');
        assert.equal(e.severity, 'FATAL');
        assert.equal(e.message, `password authentication failed for user "${user}"`);
        // Fields only PostgreSQL's own ErrorResponse carries: it was passed on, not rebuilt.
        assert.equal(e.routine, 'auth_failed');
        assert.equal(e.file, 'auth.c');
      }
    });

    test(`${mode}: unknown user and unknown database get PostgreSQL's errors`, async () => {
      const { port } = gateways[mode];
      const r = await psql(conninfo(port, 'nobody', 'sslmode=disable'), 'select 1', 'whatever');
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /FATAL:  password authentication failed for user "nobody"/);
      const u = await pgConnectError({ port, user: 'nobody', password: 'whatever' });
      assert.equal(u.code, '28P01');
      assert.equal(u.routine, 'auth_failed');
      // The database is checked after authentication: the right password is needed to learn it is missing.
      const d = await psql(conninfo(port, 'app', 'sslmode=disable', 'no_such_db'), 'select 1', USERS.app);
      assert.notEqual(d.code, 0);
      assert.match(d.stderr, /FATAL:  database "no_such_db" does not exist/);
      const de = await pgConnectError({ port, user: 'app', password: USERS.app, database: 'no_such_db' });
      assert.equal(de.code, '3D000');
      assert.equal(de.message, 'database "no_such_db" does not exist');
      assert.ok(de.routine, 'PostgreSQL error fields kept');
    });
  }

  // ------------------------------------------------------------ 2. channel binding

  describe('channel binding across a hop where trustgate terminates TLS', () => {
    /** Client TLS terminated by trustgate, TLS again towards PostgreSQL. */
    let tlsBoth: RelayGateway;
    /** Client TLS terminated by trustgate, plain TCP towards PostgreSQL. */
    let tlsClientOnly: RelayGateway;
    const seen: string[][] = [];
    const CB = 'cb_user';
    before(async () => {
      await createRole(server, CB, 'cb-pw');
      const tlsCfg = { tls: { mode: 'allow', cert_file: gwCerts.cert, key_file: gwCerts.key } };
      tlsBoth = await startRelayGateway(server, { ...tlsCfg, server: { tls: { mode: 'require' } } }, {
        current: (m, c, info) => {
          assert.equal(info.clientTls, true);
          if (m.method === 'sasl') seen.push([...m.mechanisms]);
          return c.exchange();
        },
      });
      tlsClientOnly = await startRelayGateway(server, tlsCfg);
    });
    after(async () => {
      await tlsBoth?.stop();
      await tlsClientOnly?.stop();
    });

    test('channel_binding=require without TLS: libpq refuses by itself, nothing hangs, no backend left', async () => {
      const { port } = gateways.forward;
      for (const sslmode of ['disable', 'prefer']) {
        const started = Date.now();
        const r = await psql(conninfo(port, CB, `sslmode=${sslmode} channel_binding=require`), 'select 1', 'cb-pw');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /channel binding required, but SSL not in use/);
        assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`);
      }
      assert.equal(await waitBackends(server, CB), 0);
    });

    test('channel_binding=require with TLS to trustgate: SCRAM-SHA-256-PLUS is not offered, libpq refuses cleanly', async () => {
      for (const g of [tlsBoth, tlsClientOnly]) {
        const started = Date.now();
        const r = await psql(conninfo(g.port, CB, 'sslmode=require channel_binding=require'), 'select 1', 'cb-pw');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /channel binding is required, but server did not offer an authentication method that supports channel binding/);
        assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`);
      }
      // PostgreSQL offered SCRAM-SHA-256-PLUS on its TLS hop; the callback (and the client) never saw it.
      assert.ok(seen.length > 0);
      for (const offer of seen) assert.deepEqual(offer, ['SCRAM-SHA-256']);
      assert.equal(await waitBackends(server, CB), 0);
    });

    test('TLS on both hops, libpq default channel_binding=prefer: PostgreSQL refuses the downgrade (gs2 flag y)', async () => {
      const r = await psql(conninfo(tlsBoth.port, CB, 'sslmode=require'), 'select 1', 'cb-pw');
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /FATAL:  SCRAM channel binding negotiation error/);
      // channel_binding=disable sends gs2 flag n: accepted.
      const off = await psql(conninfo(tlsBoth.port, CB, 'sslmode=require channel_binding=disable'), 'select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()', 'cb-pw');
      assert.equal(off.code, 0, off.stderr);
      assert.equal(off.stdout.trim(), `${CB}|t`);
      // Plain hop to PostgreSQL: flag y is fine there (the server has no channel to bind to).
      const plainHop = await psql(conninfo(tlsClientOnly.port, CB, 'sslmode=require'), 'select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()', 'cb-pw');
      assert.equal(plainHop.code, 0, plainHop.stderr);
      assert.equal(plainHop.stdout.trim(), `${CB}|f`);
      assert.equal(await waitBackends(server, CB), 0);
    });

    test('node-postgres over TLS: default (no channel binding, flag n) works; enableChannelBinding gets the downgrade refusal', async () => {
      const ssl = { rejectUnauthorized: false };
      const row = await pgOne<string>({ port: tlsBoth.port, user: CB, password: 'cb-pw', ssl }, 'select current_user as u');
      assert.equal(row.u, CB);
      const e = await pgConnectError({ port: tlsBoth.port, user: CB, password: 'cb-pw', ssl, enableChannelBinding: true });
      assert.equal(e.code, '28000');
      assert.equal(e.message, 'SCRAM channel binding negotiation error');
      assert.equal(e.routine, 'read_client_first_message');
      const ok = await pgOne<string>({ port: tlsClientOnly.port, user: CB, password: 'cb-pw', ssl, enableChannelBinding: true }, 'select current_user as u');
      assert.equal(ok.u, CB);
    });
  });

  // ------------------------------------------------------------ 3. the security-session callback

  describe('security-session callback', () => {
    after(() => {
      hook.current = null;
    });

    test('observe: mechanisms offered, mechanism chosen, steps and methods (SCRAM 3 calls, md5 1, cleartext 1)', async () => {
      interface Call {
        method: string;
        step: number;
        mechanisms: string[];
        chosen: string | null;
        answered: boolean;
        info: Omit<SecuritySessionInfo, 'step' | 'remote'>;
      }
      let calls: Call[] = [];
      const remotes: string[] = [];
      hook.current = async (m, c, info) => {
        const answer = await c.exchange();
        const { step, remote, ...rest } = info;
        remotes.push(remote);
        // Only a SASLInitialResponse names a mechanism; other answers may hold a password.
        calls.push({ method: m.method, step, mechanisms: [...m.mechanisms], chosen: m.method === 'sasl' && answer ? saslMechanismOf(answer) : null, answered: answer !== null, info: rest });
        return answer;
      };
      const info = (user: string) => ({ user, database: 'postgres', clientTls: false });
      for (const mode of AFTER_AUTH) {
        const { port } = gateways[mode];
        calls = [];
        const r = await psql(conninfo(port, 'app', 'sslmode=disable'), 'select 1', USERS.app);
        assert.equal(r.code, 0, r.stderr);
        assert.deepEqual(calls, [
          { method: 'sasl', step: 1, mechanisms: ['SCRAM-SHA-256'], chosen: 'SCRAM-SHA-256', answered: true, info: info('app') },
          { method: 'sasl-continue', step: 2, mechanisms: [], chosen: null, answered: true, info: info('app') },
          { method: 'sasl-final', step: 3, mechanisms: [], chosen: null, answered: false, info: info('app') },
        ]);
        calls = [];
        await pgOne({ port, user: MD5_USER, password: MD5_PW }, 'select 1');
        assert.deepEqual(calls, [{ method: 'md5', step: 1, mechanisms: [], chosen: null, answered: true, info: info(MD5_USER) }]);
        calls = [];
        await pgOne({ port, user: CLEAR_USER, password: CLEAR_PW }, 'select 1');
        assert.deepEqual(calls, [{ method: 'cleartext', step: 1, mechanisms: [], chosen: null, answered: true, info: info(CLEAR_USER) }]);
      }
      for (const remote of remotes) assert.match(remote, /^127\.0\.0\.1:\d+$/);
      // A PasswordMessage is never taken for a SASLInitialResponse (its text could be a password).
      assert.equal(saslMechanismOf(passwordMessage('UPPER-CASE-SECRET')), null);
      assert.equal(saslMechanismOf(saslInitialResponse('SCRAM-SHA-256', 'n,,n=,r=x')), 'SCRAM-SHA-256');
    });

    test('policy "SCRAM only": md5 and cleartext refused with FATAL 28000 and the callback\'s text; no backend left', async () => {
      const POLICY = 'only SCRAM-SHA-256 logins are allowed through this gateway';
      const asked: string[] = [];
      hook.current = (m, c) => {
        asked.push(m.method);
        if (m.method !== 'sasl' && m.method !== 'sasl-continue' && m.method !== 'sasl-final') throw new SecuritySessionRefusal(POLICY);
        return c.exchange();
      };
      await createRole(server, 'policy_md5', 'policy-md5-pw', 'md5');
      await createRole(server, 'policy_clear', 'policy-clear-pw', 'password');
      for (const mode of AFTER_AUTH) {
        const { port } = gateways[mode];
        for (const user of ['policy_md5', 'policy_clear']) {
          const r = await psql(conninfo(port, user, 'sslmode=disable'), 'select 1', PASSWORDS[user]);
          assert.notEqual(r.code, 0);
          assert.match(r.stderr, new RegExp(`FATAL:  ${POLICY}`));
          const e = await pgConnectError({ port, user, password: PASSWORDS[user] });
          assert.equal(e.code, '28000');
          assert.equal(e.severity, 'FATAL');
          assert.equal(e.message, POLICY);
          // The server connection was closed with the refusal (it was waiting for the password).
          assert.equal(await waitBackends(server, user), 0, `${mode}: backend of ${user} left`);
        }
        const ok = await psql(conninfo(port, 'app', 'sslmode=disable'), 'select current_user', USERS.app);
        assert.equal(ok.code, 0, ok.stderr);
        assert.equal(ok.stdout.trim(), 'app');
      }
      assert.ok(asked.includes('md5') && asked.includes('cleartext'));
      // A callback that fails (not a refusal) ends the login too, with 08001 and its message.
      hook.current = () => Promise.reject(new Error('policy service unavailable'));
      const e = await pgConnectError({ port: gateways.forward.port, user: 'policy_md5', password: 'policy-md5-pw' });
      assert.equal(e.code, '08001');
      assert.match(e.message, /policy service unavailable/);
      assert.equal(await waitBackends(server, 'policy_md5'), 0);
    });

    test('transform: the callback narrows the SASL offer (authenticationSaslMessage)', async () => {
      await createRole(server, 'narrowed', 'narrowed-pw');
      let offer: string[] = [];
      hook.current = (m, c) => (m.method === 'sasl' ? c.exchange(authenticationSaslMessage(offer)) : c.exchange());
      for (const mode of AFTER_AUTH) {
        const { port } = gateways[mode];
        // Narrowed to SCRAM-SHA-256: what the client sees is exactly the callback's list.
        offer = ['SCRAM-SHA-256'];
        const { conn, first } = await rawStart(port, 'narrowed');
        assert.deepEqual(saslMechanisms(first), ['SCRAM-SHA-256']);
        await rawScram(conn, 'narrowed-pw');
        conn.destroy();
        // Narrowed to nothing: the clients have no mechanism to choose and give up cleanly.
        offer = [];
        const raw = await rawStart(port, 'narrowed');
        assert.deepEqual(saslMechanisms(raw.first), []);
        raw.conn.destroy();
        const r = await psql(conninfo(port, 'narrowed', 'sslmode=disable'), 'select 1', 'narrowed-pw');
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /none of the server's SASL authentication mechanisms are supported/);
        const e = await pgConnectError({ port, user: 'narrowed', password: 'narrowed-pw' });
        assert.match(e.message, /SASL: Only mechanism\(s\) SCRAM-SHA-256 are supported/);
        // Pool mode keeps the connection of the successful login (idle in the pool); nothing else is left.
        const kept = mode === 'pool' ? 1 : 0;
        assert.equal(await waitBackends(server, 'narrowed', kept), kept, `${mode}: backend left`);
      }
    });

    test('answer itself: the callback supplies a cleartext password from its own store, the client is never asked', async () => {
      await createRole(server, 'vaulted', 'vaulted-pw', 'password');
      const vault = new Map([['vaulted', 'vaulted-pw']]);
      hook.current = async (m, c, info) => {
        const secret = m.method === 'cleartext' ? vault.get(info.user) : undefined;
        return secret !== undefined ? passwordMessage(secret) : c.exchange();
      };
      for (const mode of AFTER_AUTH) {
        const row = await pgOne<string>({ port: gateways[mode].port, user: 'vaulted', password: () => assert.fail('the client was asked for a password') }, 'select system_user as s');
        assert.equal(row.s, 'password:vaulted');
      }
    });

    test('an async callback with delays works (SCRAM, md5)', async () => {
      let calls = 0;
      hook.current = async (_m, c) => {
        calls++;
        await sleep(150);
        const answer = await c.exchange();
        await sleep(50);
        return answer;
      };
      for (const mode of AFTER_AUTH) {
        const { port } = gateways[mode];
        calls = 0;
        const started = Date.now();
        const r = await psql(conninfo(port, 'app', 'sslmode=disable'), 'select current_user', USERS.app);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stdout.trim(), 'app');
        assert.equal(calls, 3);
        assert.ok(Date.now() - started >= 600);
        const row = await pgOne<string>({ port, user: MD5_USER, password: MD5_PW }, 'select current_user as u');
        assert.equal(row.u, MD5_USER);
        // Order is kept: SASLFinal reaches the client before AuthenticationOk (checked by rawScram).
        const { conn, first } = await rawStart(port, 'app');
        assert.deepEqual(saslMechanisms(first), ['SCRAM-SHA-256']);
        const afterOk = await rawScram(conn, USERS.app);
        assert.equal(afterOk.at(-1)?.type, 'Z');
        conn.destroy();
      }
    });

    test('a refusal at the last step (SASLFinal, the server already accepted) still ends the login', async () => {
      await createRole(server, 'late_refusal', 'late-pw');
      hook.current = async (m, c) => {
        if (m.method === 'sasl-final') {
          await sleep(50);
          throw new SecuritySessionRefusal('refused after the server accepted');
        }
        return c.exchange();
      };
      for (const mode of AFTER_AUTH) {
        const e = await pgConnectError({ port: gateways[mode].port, user: 'late_refusal', password: 'late-pw' });
        assert.equal(e.code, '28000');
        assert.equal(e.message, 'refused after the server accepted');
        assert.equal(await waitBackends(server, 'late_refusal'), 0, `${mode}: backend left`);
      }
    });
  });

  // ------------------------------------------------------------ 4. forward mode

  describe('after_auth: forward', () => {
    test("the client talks to the server itself: the server's backend pid and key, its startup parameters", async () => {
      const { port } = gateways.forward;
      const c = await pgConnect({ port, user: 'app', password: USERS.app, application_name: 'relay-forward', options: '-c work_mem=7MB' });
      try {
        const row = (await c.query('select pg_backend_pid() as pid, current_setting(\'work_mem\') as wm')).rows[0];
        const pc = c as unknown as { processID: number; secretKey: number };
        assert.equal(pc.processID, row.pid, 'BackendKeyData carries the server backend pid');
        assert.equal(row.wm, '7MB');
        const seen = await server.query<{ application_name: string }>('select application_name from pg_stat_activity where pid = $1', [row.pid]);
        assert.equal(seen[0].application_name, 'relay-forward');
      } finally {
        await c.end();
      }
    });

    test('protocol 3.2 and _pq_ options go to the server: its NegotiateProtocolVersion, its 256-bit cancel key', async () => {
      const { port } = gateways.forward;
      const { conn, first, pre } = await rawStart(port, 'app', { '_pq_.trustgate_test': 'on', application_name: 'relay-pq' }, 2);
      try {
        assert.equal(pre.length, 1, 'one NegotiateProtocolVersion');
        const v = pre[0].bytes;
        assert.equal(v.readInt32BE(5), (3 << 16) | 2, 'the server speaks 3.2');
        assert.equal(v.readInt32BE(9), 1);
        assert.equal(v.toString('utf8', 13, v.length - 1), '_pq_.trustgate_test');
        assert.deepEqual(saslMechanisms(first), ['SCRAM-SHA-256']);
        const after = await rawScram(conn, USERS.app);
        const version = after.find((m) => m.type === 'S' && m.bytes.toString('utf8', 5).startsWith('server_version\0'));
        assert.match(version?.bytes.toString('utf8', 5) ?? '', /^server_version\0(18)\.\d/, "the server's own ParameterStatus");
        const key = after.find((m) => m.type === 'K');
        assert.ok(key);
        assert.equal(key.bytes.length - 9, 32, 'PostgreSQL 18 with protocol 3.2 issues a 32-byte key');
        const pid = key.bytes.readInt32BE(5);
        const seen = await server.query<{ pid: number }>(`select pid from pg_stat_activity where application_name = 'relay-pq'`);
        assert.deepEqual(seen.map((r) => r.pid), [pid]);
        // The spliced stream is the server's: a query goes straight through.
        conn.write(queryMessage('select 42'));
        const reply = await conn.until('Z', 5000);
        assert.deepEqual(reply.map((m) => m.type), ['T', 'D', 'C', 'Z']);
      } finally {
        conn.destroy();
      }
    });

    test('a query pipelined behind the last SASL response is answered after login (forward and pool)', async () => {
      for (const mode of AFTER_AUTH) {
        const { conn } = await rawStart(gateways[mode].port, 'app');
        try {
          const after = await rawScram(conn, USERS.app, queryMessage('select 7 as seven'));
          assert.equal(after.at(-1)?.type, 'Z');
          const reply = await conn.until('Z', 5000);
          assert.deepEqual(reply.map((m) => m.type), ['T', 'D', 'C', 'Z'], mode);
          assert.equal(reply[1].bytes.toString('utf8', 11), '7');
        } finally {
          conn.destroy();
        }
      }
    });

    test('cancel with the server\'s key reaches the server: psql Ctrl-C, node-postgres, postgres.js', async () => {
      const { port } = gateways.forward;
      await psqlCancelSleep(port, 'app', USERS.app, server);
      const config = { port, user: 'app', password: USERS.app, database: 'postgres' };
      const c = await pgConnect(config);
      try {
        assertCancelled(await pgCancelSleep(c, config, server), 'node-postgres');
        assert.equal((await c.query('select 1 as one')).rows[0].one, 1, 'the session goes on after the cancel');
      } finally {
        await c.end();
      }
      assertCancelled(await postgresJsCancelSleep(port, 'app', USERS.app, server), 'postgres.js');
      // A key nobody issued cancels nothing (and the gateway does not crash on it).
      const wrong = await pgConnect(config);
      try {
        const pc = wrong as unknown as { processID: number; secretKey: number };
        pc.secretKey = (pc.secretKey + 1) | 0;
        const q = new pg.Query('select pg_sleep(0.5)');
        const done = new Promise<Error | null>((resolve) => {
          q.on('error', resolve);
          q.on('end', () => resolve(null));
        });
        wrong.query(q);
        await waitActive(server, 'select pg_sleep(0.5)');
        (new pg.Client({ host: '127.0.0.1', ...config }) as unknown as { cancel(c: pg.Client, q: pg.Query): void }).cancel(wrong, q);
        assert.equal(await done, null, 'a wrong key must not cancel');
      } finally {
        await wrong.end();
      }
    });
  });

  // ------------------------------------------------------------ 5. pool mode

  for (const poolMode of ['session', 'transaction'] as const) {
    describe(`after_auth: pool, pool_mode ${poolMode}, pool_size 1`, () => {
      let g: RelayGateway;
      const user = `pool_${poolMode}`;
      const password = `${poolMode}-pw`;
      const config = () => ({ port: g.port, user, password, database: 'postgres' });
      before(async () => {
        await createRole(server, user, password);
        // auth.method trust is for the admin console only (a relayed client never meets it).
        g = await startRelayGateway(server, { relay: { after_auth: 'pool' }, pool: { mode: poolMode, default_size: 1 }, auth: { method: 'trust' }, admin_users: [user] });
      });
      after(() => g?.stop());

      async function showPools(): Promise<Record<string, string>> {
        const admin = await pgConnect({ port: g.port, user, database: 'trustgate' });
        try {
          const rows = (await admin.query('SHOW POOLS')).rows as Record<string, string>[];
          const row = rows.find((r) => r.user === user && r.database === 'postgres');
          assert.ok(row, JSON.stringify(rows));
          return row;
        } finally {
          await admin.end();
        }
      }

      test('sequential psql clients reuse the relayed backend; SHOW POOLS shows the pool', async () => {
        const pids: string[] = [];
        for (let i = 0; i < 3; i++) {
          const r = await psql(conninfo(g.port, user, 'sslmode=disable'), 'select pg_backend_pid(), system_user', password);
          assert.equal(r.code, 0, r.stderr);
          pids.push(r.stdout.trim());
        }
        assert.equal(new Set(pids).size, 1, `one backend: ${pids.join(', ')}`);
        assert.match(pids[0], new RegExp(`\\|scram-sha-256:${user}$`));
        // Later relayed logins found the pool full: their connections were closed after the login.
        assert.equal(await waitBackends(server, user, 1), 1);
        const pool = await showPools();
        assert.equal(pool.pool_mode, poolMode);
        assert.equal(pool.pool_size, '1');
        assert.equal(pool.sv_idle, '1');
        assert.equal(pool.sv_active, '0');
        // A wrong password is still PostgreSQL's refusal, not the pool's.
        const e = await pgConnectError({ ...config(), password: 'wrong' });
        assert.equal(e.code, '28P01');
        assert.equal(e.routine, 'auth_failed');
      });

      test("the client gets the gateway's BackendKeyData; cancel works (node-postgres, postgres.js, psql)", async () => {
        const c = await pgConnect(config());
        try {
          const pid = (await c.query('select pg_backend_pid() as pid')).rows[0].pid as number;
          const pc = c as unknown as { processID: number };
          assert.notEqual(pc.processID, pid, "the gateway's key, not the server's");
          assertCancelled(await pgCancelSleep(c, config(), server), 'node-postgres');
          assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
        } finally {
          await c.end();
        }
        assertCancelled(await postgresJsCancelSleep(g.port, user, password, server), 'postgres.js');
        await psqlCancelSleep(g.port, user, password, server);
      });

      test('a second client waits while the only connection is busy, then gets it', async () => {
        const a = await pgConnect(config());
        let b: pg.Client | null = null;
        try {
          const pidA = (await a.query('select pg_backend_pid() as pid')).rows[0].pid as number;
          // Session mode holds the connection for the session; transaction mode for the transaction.
          if (poolMode === 'transaction') await a.query('begin');
          let connected = false;
          const bConnect = pgConnect(config()).then((client) => {
            connected = true;
            b = client;
            return client;
          });
          await sleep(400);
          assert.equal(connected, false, 'the second client must wait for the busy connection');
          assert.equal((await showPools()).cl_waiting, '1');
          // B's relayed login proved its password; its own connection was closed (the pool is full).
          assert.equal(await waitBackends(server, user, 1), 1);
          if (poolMode === 'transaction') await a.query('commit');
          else await a.end();
          const client = await bConnect;
          const pidB = (await client.query('select pg_backend_pid() as pid, current_user as u')).rows[0];
          assert.deepEqual({ ...pidB }, { pid: pidA, u: user });
        } finally {
          if (poolMode === 'transaction') await a.end().catch(() => undefined);
          await (b as pg.Client | null)?.end().catch(() => undefined);
        }
      });
    });
  }

  // ------------------------------------------------------------ 6. bad input during the relay

  describe('bad input while the server authenticates the client', () => {
    before(async () => {
      hook.current = null;
      for (const u of ['bad_q', 'leaver', 'garbage', 'bad_sasl', 'silent']) await createRole(server, u, `${u}-pw`);
    });

    /** The client is closed with exactly one FATAL of `code`; returns its fields. */
    async function fatalAndClosed(conn: RawConnection, code: string, timeoutMs = 5000): Promise<Record<string, string>> {
      const { closed, messages } = await conn.drain(timeoutMs);
      assert.ok(closed, 'the gateway closed the connection');
      assert.deepEqual(messages.map((m) => m.type), ['E'], `got ${conn.describe()}`);
      const f = errorFields(messages[0]);
      assert.equal(f.S, 'FATAL');
      assert.equal(f.C, code, JSON.stringify(f));
      return f;
    }

    for (const mode of AFTER_AUTH) {
      test(`${mode}: a Query instead of the SASLInitialResponse → FATAL 08P01, the server backend is gone`, async () => {
        const { conn, first } = await rawStart(gateways[mode].port, 'bad_q');
        assert.deepEqual(saslMechanisms(first), ['SCRAM-SHA-256']);
        conn.write(queryMessage('select 1'));
        const f = await fatalAndClosed(conn, '08P01');
        assert.equal(f.M, 'expected an authentication response, got message type "Q"');
        assert.equal(await waitBackends(server, 'bad_q'), 0);
      });

      test(`${mode}: a client that leaves in the middle of SCRAM → its server connection is closed at once; others unaffected`, async () => {
        const { port } = gateways[mode];
        const other = await pgConnect({ port, user: 'app', password: USERS.app });
        try {
          const { conn, first } = await rawStart(port, 'leaver');
          assert.deepEqual(saslMechanisms(first), ['SCRAM-SHA-256']);
          const scram = new ScramClientExchange({ password: 'leaver-pw' });
          conn.write(saslInitialResponse(SCRAM_SHA_256, scram.clientFirst()));
          assert.equal(authCode(await conn.next(5000)), 11);
          assert.equal(await backends(server, 'leaver'), 1, 'a backend is authenticating');
          conn.destroy();
          // Well before limits.startup_timeout_ms (15 s here).
          assert.equal(await waitBackends(server, 'leaver', 0, 1500), 0);
          assert.equal((await other.query('select current_user as u')).rows[0].u, 'app');
          const r = await psql(conninfo(port, 'leaver', 'sslmode=disable'), 'select current_user', 'leaver-pw');
          assert.equal(r.code, 0, r.stderr);
        } finally {
          await other.end();
        }
      });

      test(`${mode}: garbage bytes during authentication → clean FATAL (54000 oversized, 08P01 malformed), the server backend is gone`, async () => {
        const { port } = gateways[mode];
        // An HTTP request where the SASLInitialResponse belongs: the "length" is absurd.
        const http = await rawStart(port, 'garbage');
        http.conn.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
        const big = await fatalAndClosed(http.conn, '54000');
        assert.match(big.M, /^message of type 0x47 is \d+ bytes, above the limit of \d+$/);
        // A length below the minimum.
        const short = await rawStart(port, 'garbage');
        short.conn.write(Buffer.from([0x70, 0, 0, 0, 2, 0xff, 0xfe]));
        await fatalAndClosed(short.conn, '08P01');
        assert.equal(await waitBackends(server, 'garbage'), 0);
      });

      test(`${mode}: a malformed SASL message is relayed, and PostgreSQL's own refusal comes back unchanged`, async () => {
        const { conn } = await rawStart(gateways[mode].port, 'bad_sasl');
        conn.write(saslInitialResponse(SCRAM_SHA_256, 'this is not a SCRAM client-first-message'));
        const f = await fatalAndClosed(conn, '08P01');
        assert.match(f.M, /malformed SCRAM message/);
        assert.ok(f.R, 'PostgreSQL routine field kept');
        assert.equal(await waitBackends(server, 'bad_sasl'), 0);
      });
    }

    test('a client that never answers is bounded by limits.startup_timeout_ms', async () => {
      for (const mode of AFTER_AUTH) {
        const g = await startRelayGateway(server, { relay: { after_auth: mode }, limits: { startup_timeout_ms: 800 } });
        try {
          const started = Date.now();
          const { conn, first } = await rawStart(g.port, 'silent');
          assert.deepEqual(saslMechanisms(first), ['SCRAM-SHA-256']);
          assert.equal(await backends(server, 'silent'), 1);
          const f = await fatalAndClosed(conn, '08P01', 5000);
          assert.equal(f.M, 'canceling authentication due to timeout');
          const took = Date.now() - started;
          assert.ok(took >= 700 && took < 3000, `took ${took} ms`);
          assert.equal(await waitBackends(server, 'silent', 0, 1500), 0);
        } finally {
          await g.stop();
        }
      }
    });

    test('server unreachable → FATAL 08001 with a readable message (psql, node-postgres)', async () => {
      const closedPort = await findFreePort();
      for (const mode of AFTER_AUTH) {
        const g = await startRelayGateway(server, { relay: { after_auth: mode }, server: { port: closedPort } });
        try {
          const started = Date.now();
          const r = await psql(conninfo(g.port, 'app', 'sslmode=disable'), 'select 1', USERS.app);
          assert.notEqual(r.code, 0);
          assert.match(r.stderr, new RegExp(`FATAL:  trustgate could not relay the login to the server: could not connect to server 127\\.0\\.0\\.1:${closedPort}: connect ECONNREFUSED`));
          const e = await pgConnectError({ port: g.port, user: 'app', password: USERS.app });
          assert.equal(e.code, '08001');
          assert.equal(e.severity, 'FATAL');
          assert.match(e.message, /could not connect to server/);
          assert.ok(Date.now() - started < 5000);
        } finally {
          await g.stop();
        }
      }
    });
  });

  test('no credential lookup was ever attempted by the relay gateways', () => {
    for (const mode of AFTER_AUTH) {
      const { logs } = gateways[mode];
      assert.ok(logs.some((l) => l.msg === 'client authenticated by the server (relay)'));
      assert.deepEqual(logs.filter((l) => /credential|users file|auth query/i.test(String(l.msg))), []);
    }
  });
});
