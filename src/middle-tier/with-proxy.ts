/**
 * Client helper for middle tiers on node-postgres: run one end-user request as a proxy user.
 *
 *   const rows = await withProxy(pool, { proxyUser: 'alice', band: { order: '42' }, trustKey }, async (client) => {
 *     return (await client.query('SELECT * FROM shop.orders')).rows;
 *   });
 *
 * It borrows a client from the pool, opens a transaction, sets the band FOR TRANSACTION (as a
 * trusted request when `trustKey` is given), runs `fn`, commits, and releases. On any error it
 * rolls back; if even that fails, the connection is destroyed instead of going back to the pool.
 * The proxy ends with the transaction, so nothing of the end user stays on the connection.
 * Only structural types are used: node-postgres is not a dependency of trustgate.
 */

export interface QueryableClient {
  query(sql: string): Promise<unknown>;
  release(destroy?: boolean | Error): void;
}

export interface ConnectingPool<C extends QueryableClient> {
  connect(): Promise<C>;
}

export interface ProxyRequest {
  /** The end user (a PERMANENT database user or an application user of a CONNECT THROUGH rule). */
  proxyUser: string;
  /** A role name, 'ALL' or 'NONE'; omitted: the rule's default (see docs/trusted-sessions.md). */
  proxyRole?: string;
  /** More name=value pairs for the query band (logged with every request). */
  band?: Record<string, string>;
  /** The trusted user's trust key: marks the band as a trusted request (needed under TRUST ONLY). */
  trustKey?: string;
}

/** Builds `SET QUERY_BAND = '…' FOR TRANSACTION`, refusing values that would change its meaning. */
export function queryBandStatement(request: ProxyRequest): string {
  const pairs: [string, string][] = [['ProxyUser', request.proxyUser]];
  if (request.proxyRole !== undefined) pairs.push(['ProxyRole', request.proxyRole]);
  for (const [name, value] of Object.entries(request.band ?? {})) pairs.push([name, value]);
  const text = pairs
    .map(([name, value]) => {
      if (!/^[A-Za-z0-9_]{1,128}$/.test(name)) throw new TypeError(`query band name ${JSON.stringify(name)} must be 1-128 letters, digits or _`);
      // ';' and '=' would start a new pair (band injection); control characters are refused by trustgate.
      if (value === '' || /[;=\u0000-\u001f\u007f]/.test(value)) throw new TypeError(`query band value for ${name} must be non-empty without ';', '=' or control characters`);
      return `${name}=${value};`;
    })
    .join('');
  const marking = request.trustKey ? `/*trustgate:trusted=${request.trustKey}*/ ` : '';
  return `${marking}SET QUERY_BAND = '${text.replace(/'/g, "''")}' FOR TRANSACTION`;
}

export async function withProxy<C extends QueryableClient, T>(pool: ConnectingPool<C>, request: ProxyRequest, fn: (client: C) => Promise<T>): Promise<T> {
  const band = queryBandStatement(request);
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
  } catch (err) {
    client.release(err as Error);
    throw err;
  }
  let result: T;
  try {
    await client.query(band);
    result = await fn(client);
    await client.query('COMMIT');
  } catch (err) {
    let broken: Error | undefined;
    await client.query('ROLLBACK').catch((rollbackError: Error) => {
      broken = rollbackError;
    });
    client.release(broken);
    throw err;
  }
  client.release();
  return result;
}
