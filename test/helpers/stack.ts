/**
 * Test stack: a real embedded PostgreSQL, the auth function installed, demo roles, and a gateway
 * in front on a free port. Each test file starts its own.
 */
import { Writable } from 'node:stream';
import { startPostgres, type EmbeddedPostgres, type EmbeddedPostgresOptions } from './postgres.js';
import { createGateway, type Gateway } from '../../src/gateway.js';
import { installAuthFunction } from '../../src/server/install.js';
import { createLogger } from '../../src/log/logger.js';
import { mergeConfig } from '../../src/config/load.js';
import type { ConfigInput } from '../../src/config/schema.js';

export const AUTH_ROLE = 'trustgate_auth';
export const AUTH_PASSWORD = 'auth-secret-for-tests';
export const AUTH_ENV = 'TRUSTGATE_TEST_AUTH_PASSWORD';
process.env[AUTH_ENV] = AUTH_PASSWORD;

/** Roles every test stack has: name → password. */
export const USERS = { app: 'app-pw', alice: 'alice-pw', bob: 'bob-pw' } as const;

export interface Stack {
  pg: EmbeddedPostgres;
  gw: Gateway;
  port: number;
  /** Log lines the gateway wrote (JSON objects). */
  logs: Record<string, unknown>[];
  url(user?: keyof typeof USERS | string, database?: string, password?: string): string;
  clientConfig(user?: string, database?: string): { host: string; port: number; user: string; password: string; database: string };
  stop(): Promise<void>;
}

export async function preparePostgres(options?: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const pg = await startPostgres({ settings: { max_connections: 300 }, ...options });
  for (const [u, pw] of Object.entries(USERS)) await pg.query(`CREATE ROLE ${u} LOGIN PASSWORD '${pw}'`);
  await pg.query('GRANT CREATE ON SCHEMA public TO app, alice, bob');
  await installTrustgate(pg);
  return pg;
}

/** What `trustgate init` runs: the auth function, the auth role, the trusted-sessions catalog. */
export function installTrustgate(pg: EmbeddedPostgres): Promise<void> {
  return installAuthFunction(
    {
      endpoint: { host: pg.host, port: pg.port, tls: { mode: 'disable' }, connectTimeoutMs: 5000 },
      database: 'postgres',
      superuser: pg.superuser,
      superuserPassword: pg.superuserPassword,
      authRole: AUTH_ROLE,
      authRolePassword: AUTH_PASSWORD,
    },
    createLogger('silent'),
  );
}

export async function startGateway(pg: EmbeddedPostgres, config: Record<string, unknown> = {}): Promise<{ gw: Gateway; logs: Record<string, unknown>[] }> {
  const logs: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      for (const line of String(chunk).split('\n')) if (line) logs.push(JSON.parse(line));
      cb();
    },
  });
  const base = {
    listen: { host: '127.0.0.1', port: 0 },
    server: { host: pg.host, port: pg.port, tls: { mode: 'disable' } },
    auth: { method: 'scram-sha-256', user: AUTH_ROLE, password_env: AUTH_ENV, database: 'postgres' },
    pool: { mode: 'transaction', default_size: 4, wait_timeout_ms: 5000 },
    admin_users: ['app'],
    log: { level: 'info' },
  };
  const gw = createGateway(mergeConfig(base, config) as ConfigInput, { logger: createLogger('info', sink) });
  await gw.start();
  return { gw, logs };
}

export async function startStack(config: Record<string, unknown> = {}, pgOptions?: EmbeddedPostgresOptions): Promise<Stack> {
  const pg = await preparePostgres(pgOptions);
  const { gw, logs } = await startGateway(pg, config);
  return stackOf(pg, gw, logs, true);
}

export function stackOf(pg: EmbeddedPostgres, gw: Gateway, logs: Record<string, unknown>[], ownsPg: boolean): Stack {
  const port = gw.address().port;
  const pw = (u: string) => (USERS as Record<string, string>)[u] ?? '';
  return {
    pg,
    gw,
    port,
    logs,
    url: (user = 'app', database = 'postgres', password = pw(user)) =>
      `postgresql://${encodeURIComponent(user)}:${encodeURIComponent(password)}@127.0.0.1:${port}/${database}`,
    clientConfig: (user = 'app', database = 'postgres') => ({ host: '127.0.0.1', port, user, password: pw(user), database }),
    stop: async () => {
      await gw.stop(2000);
      if (ownsPg) await pg.stop();
    },
  };
}
