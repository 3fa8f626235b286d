/**
 * Client authentication methods besides SCRAM and md5 (tested in tls-auth.test.ts): cleartext
 * password (checked against the server's SCRAM verifier; the gateway keeps SCRAM keys, not the
 * password), trust, and TLS client certificates (common name = user name).
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { preparePostgres, startGateway, USERS } from './helpers/stack.js';
import type { EmbeddedPostgres } from './helpers/postgres.js';
import { generateCertificates, type GeneratedCertificates } from '../src/tls/context.js';
import { createGateway } from '../src/gateway.js';

function psql(conninfo: string, sql: string, password?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      'psql',
      ['-X', '-A', '-t', '-d', conninfo, '-c', sql],
      { env: { ...process.env, PGPASSWORD: password ?? '', PGCONNECT_TIMEOUT: '5' }, timeout: 20_000 },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

describe('auth methods: password, trust, cert', () => {
  let server: EmbeddedPostgres;
  let dir: string;
  let gatewayCerts: GeneratedCertificates;
  let clientCerts: GeneratedCertificates;
  before(async () => {
    // PostgreSQL trusts the gateway for bob (trust and cert give the gateway no secret to log in with).
    server = await preparePostgres({ hbaLines: ['host all bob 127.0.0.1/32 trust'] });
    dir = mkdtempSync(path.join(os.tmpdir(), 'trustgate-certs-'));
    gatewayCerts = generateCertificates(dir, ['localhost', '127.0.0.1'], 'gateway');
    clientCerts = generateCertificates(dir, ['bob'], 'client');
  });
  after(async () => {
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('password: cleartext checked against the SCRAM verifier; the server login uses derived keys', async () => {
    const { gw } = await startGateway(server, { auth: { method: 'password' } });
    try {
      const port = gw.address().port;
      const ok = await psql(`host=127.0.0.1 port=${port} user=app dbname=postgres`, 'select current_user', USERS.app);
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(ok.stdout.trim(), 'app');
      const bad = await psql(`host=127.0.0.1 port=${port} user=app dbname=postgres`, 'select 1', 'wrong');
      assert.notEqual(bad.code, 0);
      assert.match(bad.stderr, /password authentication failed for user "app"/);
    } finally {
      await gw.stop(1000);
    }
  });

  test('trust: no password asked; PostgreSQL must trust the gateway itself', async () => {
    const { gw } = await startGateway(server, { auth: { method: 'trust' } });
    try {
      const c = new pg.Client({ host: '127.0.0.1', port: gw.address().port, user: 'bob', database: 'postgres' });
      await c.connect();
      assert.equal((await c.query('select current_user as u')).rows[0].u, 'bob');
      await c.end();
      // app is not trusted by PostgreSQL: the server's refusal reaches the client.
      const refused = await new pg.Client({ host: '127.0.0.1', port: gw.address().port, user: 'app', database: 'postgres' }).connect().catch((e) => e);
      assert.ok(refused instanceof Error);
    } finally {
      await gw.stop(1000);
    }
  });

  test('cert: config needs tls.mode require and tls.ca_file', () => {
    assert.throws(() => createGateway({ auth: { method: 'cert' } }), /auth\.method: auth\.method cert needs tls\.mode require and tls\.ca_file/);
  });

  test('cert: a client certificate whose CN is the user logs in; none or another user is refused', async () => {
    const { gw } = await startGateway(server, {
      auth: { method: 'cert' },
      tls: { mode: 'require', cert_file: gatewayCerts.cert, key_file: gatewayCerts.key, ca_file: clientCerts.caCert },
    });
    try {
      const base = `host=localhost port=${gw.address().port} dbname=postgres sslmode=verify-full sslrootcert=${gatewayCerts.caCert}`;
      const withCert = `${base} sslcert=${clientCerts.cert} sslkey=${clientCerts.key}`;
      const ok = await psql(`${withCert} user=bob`, 'select current_user');
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(ok.stdout.trim(), 'bob');
      const noCert = await psql(`${base} user=bob`, 'select 1');
      assert.notEqual(noCert.code, 0);
      assert.match(noCert.stderr, /connection requires a valid client certificate/);
      const otherUser = await psql(`${withCert} user=alice`, 'select 1');
      assert.notEqual(otherUser.code, 0);
      assert.match(otherUser.stderr, /certificate authentication failed for user "alice"/);
      // A certificate from another CA (the gateway's own server cert) is not accepted.
      const foreign = await psql(`${base} user=localhost sslcert=${gatewayCerts.cert} sslkey=${gatewayCerts.key}`, 'select 1');
      assert.notEqual(foreign.code, 0);
    } finally {
      await gw.stop(1000);
    }
  });
});
