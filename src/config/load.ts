/** Reads, merges and validates configuration; errors name the offending key. */
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { configSchema, type Config, type ConfigInput } from './schema.js';

export class ConfigError extends Error {
  constructor(
    message: string,
    readonly issues: string[] = [],
  ) {
    super(issues.length ? `${message}:\n  - ${issues.join('\n  - ')}` : message);
    this.name = 'ConfigError';
  }
}

/** Validates a config object (from a file, the API or both merged). */
export function parseConfig(input: unknown, source = 'configuration'): Config {
  const result = configSchema.safeParse(input ?? {});
  if (result.success) return result.data;
  const issues = result.error.issues.map((i) => {
    const key = i.path.length ? i.path.join('.') : '(top level)';
    return `${key}: ${i.message}`;
  });
  throw new ConfigError(`invalid ${source}`, issues);
}

export function readConfigFile(path: string): ConfigInput {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read config file ${path}: ${(err as Error).message}`);
  }
  try {
    return (parseYaml(text) ?? {}) as ConfigInput;
  } catch (err) {
    throw new ConfigError(`config file ${path} is not valid YAML: ${(err as Error).message}`);
  }
}

/** Deep merge of plain objects; arrays and scalars in `override` replace. */
export function mergeConfig(base: Record<string, unknown>, override: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(override)) {
    if (v === undefined) continue;
    const prev = out[k];
    out[k] =
      v && typeof v === 'object' && !Array.isArray(v) && prev && typeof prev === 'object' && !Array.isArray(prev)
        ? mergeConfig(prev as Record<string, unknown>, v as Record<string, unknown>)
        : v;
  }
  return out;
}

/** Settings that may also come from the environment (TRUSTGATE_*), applied over the file. */
export function configFromEnv(env: NodeJS.ProcessEnv = process.env): Record<string, unknown> {
  const out: Record<string, any> = {};
  const num = (v: string | undefined) => (v === undefined || v === '' ? undefined : Number(v));
  if (env.TRUSTGATE_LISTEN_HOST) (out.listen ??= {}).host = env.TRUSTGATE_LISTEN_HOST;
  if (env.TRUSTGATE_LISTEN_PORT) (out.listen ??= {}).port = num(env.TRUSTGATE_LISTEN_PORT);
  if (env.TRUSTGATE_SERVER_HOST) (out.server ??= {}).host = env.TRUSTGATE_SERVER_HOST;
  if (env.TRUSTGATE_SERVER_PORT) (out.server ??= {}).port = num(env.TRUSTGATE_SERVER_PORT);
  if (env.TRUSTGATE_POOL_MODE) (out.pool ??= {}).mode = env.TRUSTGATE_POOL_MODE;
  if (env.TRUSTGATE_POOL_SIZE) (out.pool ??= {}).default_size = num(env.TRUSTGATE_POOL_SIZE);
  if (env.TRUSTGATE_LOG_LEVEL) (out.log ??= {}).level = env.TRUSTGATE_LOG_LEVEL;
  return out;
}

/** File (optional) < environment < explicit overrides (CLI flags), then validation. */
export function loadConfig(path: string | undefined, overrides: Record<string, unknown> = {}, env = process.env): Config {
  const fromFile = path ? (readConfigFile(path) as Record<string, unknown>) : {};
  const merged = mergeConfig(mergeConfig(fromFile, configFromEnv(env)), overrides);
  return parseConfig(merged, path ? `config file ${path}` : 'configuration');
}
