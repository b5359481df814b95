import { readFileSync } from 'node:fs'
import { parseEnv } from 'node:util'
import { Type, type Static } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { mariaDbUrlFromEnv, parseLegacyRedis } from './connection-strings.js'
import { DEFAULT_KEEP_ALIVE, parseKeepAlive, type KeepAlive } from './ollama-normalizer.js'

/** Every variable the gateway reads (CONTRACT section 2), with its default. */
export const EnvSchema = Type.Object({
  MARIADB_URL: Type.Optional(Type.String({ pattern: '^(mysql|mariadb)://' })),
  ConnectionStrings__MariaDb: Type.Optional(Type.String()),
  REDIS_URL: Type.Optional(Type.String({ pattern: '^rediss?://' })),
  ConnectionStrings__Redis: Type.Optional(Type.String()),
  REDIS_KEY_PREFIX: Type.String({ default: 'maestro:', minLength: 1, maxLength: 100 }),
  INVENTORY_FILE: Type.Optional(Type.String()),
  INVENTORY_REFRESH_MS: Type.Integer({ default: 10000, minimum: 100 }),
  LEASE_TTL_MS: Type.Integer({ default: 30000, minimum: 300 }),
  QUEUE_MAX: Type.Integer({ default: 1000, minimum: 0 }),
  QUEUE_MAX_TOTAL: Type.Integer({ default: 10000, minimum: 0 }),
  PRIORITY_AGING_MS: Type.Integer({ default: 30000, minimum: 0 }),
  QUEUE_TIMEOUT_MS: Type.Integer({ default: 300000, minimum: 0 }),
  STARVATION_MS: Type.Integer({ default: 10000, minimum: 0 }),
  OLLAMA_KEEP_ALIVE: Type.String({ default: DEFAULT_KEEP_ALIVE, minLength: 1 }),
  BODY_LIMIT: Type.Integer({ default: 52428800, minimum: 1 }),
  UPSTREAM_HEADERS_TIMEOUT_MS: Type.Integer({ default: 300000, minimum: 1 }),
  BODY_MEMORY_LIMIT: Type.Integer({ default: 268435456, minimum: 1 }),
  UPSTREAM_POLL_MS: Type.Integer({ default: 5000, minimum: 50 }),
  UPSTREAM_CANCEL_GRACE_MS: Type.Integer({ default: 250, minimum: 0 }),
  ADMIN_TOKEN: Type.Optional(Type.String()),
  API_KEYS: Type.Optional(Type.String()),
  TRUST_PROXY: Type.Boolean({ default: false }),
  WARM_MODELS: Type.Optional(Type.String())
})
export type Env = Static<typeof EnvSchema>

/** The variables only the standalone server reads (the embeddable app never listens or logs by itself). */
export const ServerEnvSchema = Type.Object({
  NODE_ENV: Type.Optional(Type.String()),
  PORT: Type.Optional(Type.Integer({ minimum: 0, maximum: 65535 })),
  HOST: Type.String({ default: '0.0.0.0' }),
  SHUTDOWN_GRACE_MS: Type.Integer({ default: 30000, minimum: 0 }),
  LOG_LEVEL: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)), { default: 'info' })
})

export interface GatewayConfig {
  mariadbUrl?: string
  redisUrl?: string
  redisKeyPrefix: string
  inventoryFile?: string
  inventoryRefreshMs: number
  leaseTtlMs: number
  queueMax: number
  /** Waiters across every model's queue. */
  queueMaxTotal: number
  /** A waiter that has waited this long is served as one priority level higher. */
  priorityAgingMs: number
  queueTimeoutMs: number
  starvationMs: number
  keepAlive: KeepAlive
  bodyLimit: number
  upstreamHeadersTimeoutMs: number
  /** Bytes of request bodies held at once by waiting and in-flight requests. */
  bodyMemoryLimit: number
  /** How often the Ollama upstreams' /api/ps, /api/tags and /api/version are read in the background. */
  upstreamPollMs: number
  /** After a client leaves mid-answer, how long its GPUs stay leased while the upstream notices. */
  upstreamCancelGraceMs: number
  adminToken?: string
  apiKeys: string[]
  /** Take a client's address from the first hop of X-Forwarded-For (behind a proxy that sets it). */
  trustProxy: boolean
  /** Models loaded on each of their upstreams at start and when an upstream comes back. */
  warmModels: string[]
}

/** Thrown for a value that cannot be used; the message names the variable. */
export class ConfigError extends Error {
  constructor (variable: string, problem: string) {
    super(`${variable}: ${problem}`)
    this.name = 'ConfigError'
  }
}

/** Drop unset and empty values: a variable set to the empty string counts as unset. */
export function withoutEmpty (source: Record<string, unknown> | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(source ?? {})) {
    if (v !== undefined && v !== null && v !== '') out[k] = v
  }
  return out
}

/** The `.env` file of the working directory, if there is one. */
export function readDotenv (path = '.env'): Record<string, string> {
  try {
    return parseEnv(readFileSync(path, 'utf8')) as Record<string, string>
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {}
    throw new ConfigError(path, (err as Error).message)
  }
}

/**
 * The layers of configuration, weakest first: `.env`, the environment, then explicit options
 * (plugin options when embedded). Each later layer wins.
 */
export function configSources (options: Record<string, unknown> = {}, env: NodeJS.ProcessEnv = process.env): Array<Record<string, unknown>> {
  const useDotenv = options.dotenv !== false
  const { dotenv: _dotenv, ...rest } = options
  return [useDotenv ? withoutEmpty(readDotenv()) : {}, withoutEmpty(env), withoutEmpty(rest)]
}

function wrap<T> (variable: string, fn: () => T): T {
  try {
    return fn()
  } catch (err) {
    throw new ConfigError(variable, (err as Error).message)
  }
}

/** Turn validated variables into the settings the gateway runs on. */
export function resolveConfig (env: Env): GatewayConfig {
  const mariadbUrl = wrap(env.MARIADB_URL != null ? 'MARIADB_URL' : 'ConnectionStrings__MariaDb',
    () => mariaDbUrlFromEnv(env as unknown as NodeJS.ProcessEnv))
  const redisUrl = env.REDIS_URL ??
    (env.ConnectionStrings__Redis != null
      ? wrap('ConnectionStrings__Redis', () => parseLegacyRedis(env.ConnectionStrings__Redis as string))
      : undefined)
  return {
    mariadbUrl,
    redisUrl,
    redisKeyPrefix: env.REDIS_KEY_PREFIX,
    inventoryFile: env.INVENTORY_FILE,
    inventoryRefreshMs: env.INVENTORY_REFRESH_MS,
    leaseTtlMs: env.LEASE_TTL_MS,
    queueMax: env.QUEUE_MAX,
    queueMaxTotal: env.QUEUE_MAX_TOTAL,
    priorityAgingMs: env.PRIORITY_AGING_MS,
    queueTimeoutMs: env.QUEUE_TIMEOUT_MS,
    starvationMs: env.STARVATION_MS,
    keepAlive: wrap('OLLAMA_KEEP_ALIVE', () => parseKeepAlive(env.OLLAMA_KEEP_ALIVE)),
    bodyLimit: env.BODY_LIMIT,
    upstreamHeadersTimeoutMs: env.UPSTREAM_HEADERS_TIMEOUT_MS,
    bodyMemoryLimit: env.BODY_MEMORY_LIMIT,
    upstreamPollMs: env.UPSTREAM_POLL_MS,
    upstreamCancelGraceMs: env.UPSTREAM_CANCEL_GRACE_MS,
    adminToken: env.ADMIN_TOKEN,
    apiKeys: (env.API_KEYS ?? '').split(',').map((k) => k.trim()).filter(Boolean),
    trustProxy: env.TRUST_PROXY,
    warmModels: (env.WARM_MODELS ?? '').split(',').map((m) => m.trim()).filter(Boolean)
  }
}

export interface ServerSettings {
  port: number
  /** After SIGTERM, how long in-flight streams may take before the process exits anyway. */
  shutdownGraceMs: number
  host: string
  logLevel: string
  production: boolean
}

/** PORT, HOST, LOG_LEVEL and NODE_ENV, checked before the server is built. */
export function serverSettings (sources: Array<Record<string, unknown>>): ServerSettings {
  const merged = Object.assign({}, ...sources)
  const picked: Record<string, unknown> = {}
  for (const key of Object.keys(ServerEnvSchema.properties)) {
    if (merged[key] !== undefined) picked[key] = merged[key]
  }
  const value = Value.Default(ServerEnvSchema, Value.Convert(ServerEnvSchema, picked))
  const error = Value.Errors(ServerEnvSchema, value).First()
  if (error != null) throw new ConfigError(error.path.slice(1), `${error.message} (got ${JSON.stringify(picked[error.path.slice(1)])})`)
  const env = value as Static<typeof ServerEnvSchema>
  const production = env.NODE_ENV === 'production'
  return { port: env.PORT ?? (production ? 8080 : 5000), host: env.HOST, logLevel: env.LOG_LEVEL, production, shutdownGraceMs: env.SHUTDOWN_GRACE_MS }
}
