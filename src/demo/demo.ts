/**
 * `trustgate demo`: a real embedded PostgreSQL, a demo database with roles and a small schema,
 * and the gateway in front of it with TLS (self-signed CA) and SCRAM. It is set up for the
 * trusted-sessions story: `app_tier` (the middle tier) may act for the permanent users alice and
 * bob, and `shop.orders` has a row-level-security policy by proxy user.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { EmbeddedPostgres, findFreePort } from '../embedded/postgres.js';
import { createGateway, type Gateway } from '../gateway.js';
import { installAuthFunction } from '../server/install.js';
import { generateCertificates } from '../tls/context.js';
import { createLogger } from '../log/logger.js';

export interface DemoOptions {
  port?: number;
  dataDir?: string;
  logLevel?: string;
  poolMode?: 'session' | 'transaction';
}

export interface Demo {
  gateway: Gateway;
  postgres: EmbeddedPostgres;
  adminUrl: string;
  /** The middle tier's URL (trusted user app_tier). */
  appUrl: string;
  psqlCommand: string;
  caFile: string;
  stop(): Promise<void>;
}

const DEMO_SCHEMA = `
CREATE SCHEMA shop AUTHORIZATION demo_admin;
CREATE TABLE shop.products (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE shop.orders (id serial PRIMARY KEY, customer text NOT NULL, product_id int REFERENCES shop.products, qty int NOT NULL, placed_at timestamptz DEFAULT now());
INSERT INTO shop.products VALUES (1, 'espresso', 2.50), (2, 'cappuccino', 3.20), (3, 'croissant', 1.90);
INSERT INTO shop.orders (customer, product_id, qty) VALUES ('alice', 1, 2), ('bob', 3, 1), ('alice', 2, 1);
GRANT USAGE ON SCHEMA shop TO app_tier, alice, bob, shop_clerk;
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA shop TO app_tier;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA shop TO app_tier, shop_clerk;
GRANT SELECT ON ALL TABLES IN SCHEMA shop TO alice, bob, shop_clerk;
GRANT INSERT ON shop.orders TO shop_clerk;
ALTER TABLE shop.products OWNER TO demo_admin;
ALTER TABLE shop.orders OWNER TO demo_admin;
-- Trusted sessions: each end user sees only their own orders; the middle tier itself sees all.
ALTER TABLE shop.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_orders ON shop.orders USING (customer = (SELECT trustgate.proxy_user()));
CREATE POLICY middle_tier ON shop.orders TO app_tier USING (true);
`;

/** The end users and roles of the story, and the demo administrator's rights over them. */
const DEMO_ROLES = `
CREATE ROLE alice NOLOGIN;
CREATE ROLE bob NOLOGIN;
CREATE ROLE shop_clerk NOLOGIN;
GRANT trustgate_admin TO demo_admin;
GRANT alice, bob, shop_clerk TO demo_admin WITH ADMIN OPTION;
`;

/** Rules granted at the start, as `GRANT CONNECT THROUGH app_tier TO PERMANENT alice, bob WITHOUT ROLE`. */
const DEMO_RULES = JSON.stringify({ kind: 'grant-permanent', trustedUser: 'app_tier', users: ['alice', 'bob'], withoutRole: true, roles: [] });

export async function startDemo(options: DemoOptions = {}): Promise<Demo> {
  const log = createLogger(options.logLevel ?? 'info');
  const workDir = mkdtempSync(path.join(os.tmpdir(), 'trustgate-demo-'));
  const adminPassword = randomBytes(9).toString('base64url');
  const appPassword = randomBytes(9).toString('base64url');
  const authPassword = randomBytes(18).toString('base64url');
  process.env.TRUSTGATE_AUTH_PASSWORD = authPassword;

  log.info('starting embedded PostgreSQL');
  const postgres = new EmbeddedPostgres({
    baseDir: options.dataDir,
    persistent: Boolean(options.dataDir),
    settings: { max_connections: 200 },
  });
  await postgres.start();
  try {
    const fresh = (await postgres.query(`SELECT 1 FROM pg_roles WHERE rolname = 'demo_admin'`)).length === 0;
    if (fresh) {
      await postgres.query(`CREATE ROLE demo_admin LOGIN CREATEROLE CREATEDB PASSWORD '${adminPassword}'`);
      await postgres.query(`CREATE ROLE app_tier LOGIN PASSWORD '${appPassword}'`);
      await postgres.query('CREATE DATABASE demo OWNER demo_admin');
    } else {
      await postgres.query(`ALTER ROLE demo_admin PASSWORD '${adminPassword}'`);
      await postgres.query(`ALTER ROLE app_tier PASSWORD '${appPassword}'`);
    }
    const endpoint = { host: postgres.host, port: postgres.port, tls: { mode: 'disable' as const }, connectTimeoutMs: 10_000 };
    for (const database of ['postgres', 'demo']) {
      await installAuthFunction(
        { endpoint, database, superuser: postgres.superuser, superuserPassword: postgres.superuserPassword, authRole: 'trustgate_auth', authRolePassword: authPassword },
        log,
      );
    }
    await postgres.query(`ALTER ROLE trustgate_auth PASSWORD '${authPassword}'`);
    if (fresh) {
      // Needs the catalog (trustgate_admin, trustgate.proxy_user()) installed above.
      await postgres.query(DEMO_ROLES);
      await postgres.query(DEMO_SCHEMA, [], { database: 'demo' });
      await postgres.query('CALL trustgate.apply_connect_through($1::jsonb)', [DEMO_RULES], { database: 'demo', user: 'demo_admin', password: adminPassword });
    }
    const certs = generateCertificates(workDir, ['localhost', '127.0.0.1', '::1']);
    const port = options.port ?? ((await isPortFree(6432)) ? 6432 : await findFreePort());
    const gateway = createGateway(
      {
        listen: { host: '127.0.0.1', port },
        server: { host: postgres.host, port: postgres.port, tls: { mode: 'disable' } },
        tls: { mode: 'allow', cert_file: certs.cert, key_file: certs.key },
        auth: { method: 'scram-sha-256', user: 'trustgate_auth' },
        pool: { mode: options.poolMode ?? 'transaction', default_size: 10 },
        admin_users: ['demo_admin'],
        // The demo records its query and access logs in the demo database (docs/audit.md).
        audit: { enabled: true, database_name: 'demo', spool_dir: path.join(workDir, 'audit-spool') },
        log: { level: (options.logLevel ?? 'info') as 'info' },
      },
      { logger: log },
    );
    await gateway.start();
    const listening = gateway.address().port;
    const adminUrl = `postgresql://demo_admin:${adminPassword}@localhost:${listening}/demo`;
    const appUrl = `postgresql://app_tier:${appPassword}@localhost:${listening}/demo`;
    const stop = async () => {
      await gateway.stop(5000);
      await postgres.stop();
      rmSync(workDir, { recursive: true, force: true });
    };
    return {
      gateway,
      postgres,
      adminUrl,
      appUrl,
      caFile: certs.caCert,
      psqlCommand: `psql "${adminUrl}?sslmode=verify-full&sslrootcert=${certs.caCert}"`,
      stop,
    };
  } catch (err) {
    await postgres.stop();
    rmSync(workDir, { recursive: true, force: true });
    throw err;
  }
}

async function isPortFree(port: number): Promise<boolean> {
  const net = await import('node:net');
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}
