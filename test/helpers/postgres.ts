import { EmbeddedPostgres, type EmbeddedPostgresOptions } from '../../src/embedded/postgres.js';

export { EmbeddedPostgres, findFreePort } from '../../src/embedded/postgres.js';
export type {
  EmbeddedPostgresOptions,
  EmbeddedConnectOptions,
  EmbeddedConnectionConfig,
} from '../../src/embedded/postgres.js';

/**
 * Start an embedded PostgreSQL server and return it.
 * Typical use: `const pg = await startPostgres(); after(() => pg.stop());`
 */
export async function startPostgres(options?: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const pg = new EmbeddedPostgres(options);
  try {
    await pg.start();
  } catch (err) {
    await pg.stop().catch(() => undefined);
    throw err;
  }
  return pg;
}
