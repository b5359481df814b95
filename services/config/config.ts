import { readFileSync } from 'node:fs'
import { parseEnv } from 'node:util'
import { Type, type Static } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { mariaDbUrlFromEnv, parseHostPortList, parseLegacyRedis, type HostPort } from './connection-strings.js'
import { DEFAULT_KEEP_ALIVE, parseKeepAlive, type KeepAlive } from '../http/ollama-normalizer.js'
import { parseOriginList } from '../clients/origins.js'
import { DEFAULT_SERVICE_NAME, otlpTracesUrl, type TracingConfig } from '../tracing/request-trace.js'

/** Every variable the gateway reads (CONTRACT section 2), with its default. */
export const EnvSchema = Type.Object({
  MARIADB_URL: Type.Optional(Type.String({ pattern: '^(mysql|mariadb)://' })),
  ConnectionStrings__MariaDb: Type.Optional(Type.String()),
  REDIS_URL: Type.Optional(Type.String({ pattern: '^rediss?://' })),
  ConnectionStrings__Redis: Type.Optional(Type.String()),
  REDIS_SENTINELS: Type.Optional(Type.String()),
  REDIS_SENTINEL_MASTER: Type.String({ default: 'mymaster', minLength: 1 }),
  REDIS_CLUSTER_NODES: Type.Optional(Type.String()),
  REDIS_USERNAME: Type.Optional(Type.String()),
  REDIS_PASSWORD: Type.Optional(Type.String()),
  REDIS_SENTINEL_USERNAME: Type.Optional(Type.String()),
  REDIS_SENTINEL_PASSWORD: Type.Optional(Type.String()),
  REDIS_TLS: Type.Boolean({ default: false }),
  REDIS_SENTINEL_TLS: Type.Boolean({ default: false }),
  REDIS_KEY_PREFIX: Type.String({ default: 'maestro:', minLength: 1, maxLength: 100 }),
  LEASE_STORE: Type.Optional(Type.Union([Type.Literal('redis'), Type.Literal('memory')])),
  NODE_ENV: Type.Optional(Type.String()),
  INVENTORY_FILE: Type.Optional(Type.String()),
  INVENTORY_REFRESH_MS: Type.Integer({ default: 10000, minimum: 100 }),
  LEASE_TTL_MS: Type.Integer({ default: 30000, minimum: 300 }),
  QUEUE_MAX: Type.Integer({ default: 1000, minimum: 0 }),
  QUEUE_MAX_TOTAL: Type.Integer({ default: 10000, minimum: 0 }),
  PRIORITY_AGING_MS: Type.Integer({ default: 30000, minimum: 0 }),
  QUEUE_TIMEOUT_MS: Type.Integer({ default: 300000, minimum: 0 }),
  FALLBACK_AFTER_MS: Type.Optional(Type.Integer({ minimum: 0 })),
  AFFINITY_ENTRIES: Type.Integer({ default: 100000, minimum: 0 }),
  AFFINITY_TTL_MS: Type.Integer({ default: 1800000, minimum: 1000 }),
  AFFINITY_MAX_WAIT_MS: Type.Integer({ default: 10000, minimum: 0 }),
  STARVATION_MS: Type.Integer({ default: 10000, minimum: 0 }),
  OLLAMA_KEEP_ALIVE: Type.String({ default: DEFAULT_KEEP_ALIVE, minLength: 1 }),
  BODY_LIMIT: Type.Integer({ default: 52428800, minimum: 1 }),
  UPSTREAM_HEADERS_TIMEOUT_MS: Type.Integer({ default: 300000, minimum: 1 }),
  BODY_MEMORY_LIMIT: Type.Integer({ default: 268435456, minimum: 1 }),
  UPSTREAM_POLL_MS: Type.Integer({ default: 5000, minimum: 50 }),
  UPSTREAM_CANCEL_GRACE_MS: Type.Integer({ default: 250, minimum: 0 }),
  EVENT_STREAMS_MAX: Type.Integer({ default: 100, minimum: 1 }),
  USAGE_ROLLUP_MS: Type.Integer({ default: 60000, minimum: 1000 }),
  ADMIN_TOKEN: Type.Optional(Type.String()),
  API_KEYS: Type.Optional(Type.String()),
  ALLOWED_ORIGINS: Type.Optional(Type.String()),
  OLLAMA_ORIGINS: Type.Optional(Type.String()),
  TRUST_PROXY: Type.Boolean({ default: false }),
  WARM_MODELS: Type.Optional(Type.String()),
  OTEL_EXPORTER_OTLP_ENDPOINT: Type.Optional(Type.String({ pattern: '^https?://' })),
  OTEL_SERVICE_NAME: Type.Optional(Type.String({ minLength: 1 })),
  OTEL_EXPORTER_OTLP_HEADERS: Type.Optional(Type.String())
})
export type Env = Static<typeof EnvSchema>

/** The variables only the standalone server reads (the embeddable app never listens or logs by itself). */
export const ServerEnvSchema = Type.Object({
  PORT: Type.Optional(Type.Integer({ minimum: 0, maximum: 65535 })),
  HOST: Type.String({ default: '0.0.0.0' }),
  SHUTDOWN_GRACE_MS: Type.Integer({ default: 30000, minimum: 0 }),
  LOG_LEVEL: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)), { default: 'info' })
})

/** Credentials and TLS for the Redis data nodes (and the sentinels), from the REDIS_* variables. */
export interface RedisAuth {
  username?: string
  password?: string
  sentinelUsername?: string
  sentinelPassword?: string
  tls: boolean
  sentinelTls: boolean
}

/** Which Redis holds the leases: one server, a Sentinel-watched master, or a Cluster. */
export type RedisTopology =
  | { kind: 'standalone', url: string, auth: RedisAuth }
  | { kind: 'sentinel', sentinels: HostPort[], master: string, auth: RedisAuth }
  | { kind: 'cluster', nodes: HostPort[], auth: RedisAuth }

export interface GatewayConfig {
  mariadbUrl?: string
  /** Where leases live; undefined = process memory (`LEASE_STORE=memory`, or no Redis outside production). */
  redis?: RedisTopology
  /** The prefix every key and channel starts with; on a Cluster it carries one hash tag (`{maestro}:`). */
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
  /** A request whose expected wait passes this goes to a fallback model that can serve it sooner; undefined: never by wait. */
  fallbackAfterMs?: number
  /** Prefix affinity (CONTRACT 16.2): entries per model (0: off), their life, the longest wait for the server holding a prefix. */
  affinityEntries: number
  affinityTtlMs: number
  affinityMaxWaitMs: number
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
  /** `GET /gpu/events` streams open at once on this replica (and at most 10 per client). */
  eventStreamsMax: number
  /** How often one replica moves the usage counted in Redis into MariaDB's `maestro_usage_hourly`. */
  usageRollupMs: number
  adminToken?: string
  apiKeys: string[]
  /** Browser origins allowed to write without a credential, beyond loopback and local apps (ALLOWED_ORIGINS and OLLAMA_ORIGINS). */
  allowedOrigins: string[]
  /** Take a client's address from the first hop of X-Forwarded-For (behind a proxy that sets it). */
  trustProxy: boolean
  /** Models loaded on each of their upstreams at start and when an upstream comes back. */
  warmModels: string[]
  /** Where request spans go over OTLP/HTTP; undefined: tracing off (no OpenTelemetry module is loaded). */
  tracing?: TracingConfig
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

/**
 * Redis Cluster runs a script only on keys of one slot: the prefix gets a hash tag so every key
 * and channel of the fleet hashes alike. `maestro:` becomes `{maestro}:`; a prefix that already
 * has a non-empty `{...}` is kept as it is.
 */
export function clusterKeyPrefix (prefix: string): string {
  if (/\{[^}]+\}/.test(prefix)) return prefix
  const [, body, colons] = /^(.*?)(:*)$/.exec(prefix) as RegExpExecArray
  return `{${body === '' ? prefix : body}}${body === '' ? '' : colons}`
}

/** The one Redis topology the variables name, or undefined; naming two is an error. */
function redisTopology (env: Env): RedisTopology | undefined {
  const auth: RedisAuth = {
    username: env.REDIS_USERNAME,
    password: env.REDIS_PASSWORD,
    sentinelUsername: env.REDIS_SENTINEL_USERNAME,
    sentinelPassword: env.REDIS_SENTINEL_PASSWORD,
    tls: env.REDIS_TLS,
    sentinelTls: env.REDIS_SENTINEL_TLS
  }
  const url = env.REDIS_URL ??
    (env.ConnectionStrings__Redis != null
      ? wrap('ConnectionStrings__Redis', () => parseLegacyRedis(env.ConnectionStrings__Redis as string))
      : undefined)
  const named = [
    url != null ? (env.REDIS_URL != null ? 'REDIS_URL' : 'ConnectionStrings__Redis') : undefined,
    env.REDIS_SENTINELS != null ? 'REDIS_SENTINELS' : undefined,
    env.REDIS_CLUSTER_NODES != null ? 'REDIS_CLUSTER_NODES' : undefined
  ].filter((n) => n != null)
  if (named.length > 1) throw new ConfigError(named[1], `set only one of ${named.join(', ')}: each names a different Redis`)
  if (env.REDIS_SENTINELS != null) {
    const sentinels = wrap('REDIS_SENTINELS', () => parseHostPortList(env.REDIS_SENTINELS as string, 26379))
    return { kind: 'sentinel', sentinels, master: env.REDIS_SENTINEL_MASTER, auth }
  }
  if (env.REDIS_CLUSTER_NODES != null) {
    return { kind: 'cluster', nodes: wrap('REDIS_CLUSTER_NODES', () => parseHostPortList(env.REDIS_CLUSTER_NODES as string, 6379)), auth }
  }
  return url != null ? { kind: 'standalone', url, auth } : undefined
}

/**
 * Leases in process memory are right for one replica only. In production that must be said
 * (`LEASE_STORE=memory`): a fleet that lost its Redis setting would otherwise start every replica
 * with its own leases and hand the same GPU out twice.
 */
function leaseRedis (env: Env): RedisTopology | undefined {
  const topology = redisTopology(env)
  if (env.LEASE_STORE === 'memory') return undefined
  if (topology == null && env.LEASE_STORE === 'redis') {
    throw new ConfigError('LEASE_STORE', 'redis needs REDIS_URL, REDIS_SENTINELS or REDIS_CLUSTER_NODES')
  }
  if (topology == null && env.NODE_ENV === 'production') {
    throw new ConfigError('LEASE_STORE', 'NODE_ENV=production with no Redis: set REDIS_URL, REDIS_SENTINELS or REDIS_CLUSTER_NODES for a fleet, or LEASE_STORE=memory for a single replica')
  }
  return topology
}

/**
 * `REDIS_*` and `MARIADB_*` variables the gateway does not read (a typo, or one of those
 * Kubernetes injects for a Service named `redis`: `REDIS_SERVICE_HOST`, `REDIS_PORT=tcp://...`).
 * Named in a warning at start, never an error. Names only: values may be secrets.
 */
export function unknownVariables (sources: Array<Record<string, unknown>>): string[] {
  const known = new Set([...Object.keys(EnvSchema.properties), ...Object.keys(ServerEnvSchema.properties)])
  const names = new Set<string>()
  for (const source of sources) {
    for (const name of Object.keys(source)) {
      if (/^(REDIS|MARIADB)_/.test(name) && !known.has(name)) names.add(name)
    }
  }
  return [...names].sort()
}

/** Turn validated variables into the settings the gateway runs on. */
export function resolveConfig (env: Env): GatewayConfig {
  const mariadbUrl = wrap(env.MARIADB_URL != null ? 'MARIADB_URL' : 'ConnectionStrings__MariaDb',
    () => mariaDbUrlFromEnv(env as unknown as NodeJS.ProcessEnv))
  const redis = leaseRedis(env)
  return {
    mariadbUrl,
    redis,
    redisKeyPrefix: redis?.kind === 'cluster' ? clusterKeyPrefix(env.REDIS_KEY_PREFIX) : env.REDIS_KEY_PREFIX,
    inventoryFile: env.INVENTORY_FILE,
    inventoryRefreshMs: env.INVENTORY_REFRESH_MS,
    leaseTtlMs: env.LEASE_TTL_MS,
    queueMax: env.QUEUE_MAX,
    queueMaxTotal: env.QUEUE_MAX_TOTAL,
    priorityAgingMs: env.PRIORITY_AGING_MS,
    queueTimeoutMs: env.QUEUE_TIMEOUT_MS,
    fallbackAfterMs: env.FALLBACK_AFTER_MS,
    affinityEntries: env.AFFINITY_ENTRIES,
    affinityTtlMs: env.AFFINITY_TTL_MS,
    affinityMaxWaitMs: env.AFFINITY_MAX_WAIT_MS,
    starvationMs: env.STARVATION_MS,
    keepAlive: wrap('OLLAMA_KEEP_ALIVE', () => parseKeepAlive(env.OLLAMA_KEEP_ALIVE)),
    bodyLimit: env.BODY_LIMIT,
    upstreamHeadersTimeoutMs: env.UPSTREAM_HEADERS_TIMEOUT_MS,
    bodyMemoryLimit: env.BODY_MEMORY_LIMIT,
    upstreamPollMs: env.UPSTREAM_POLL_MS,
    upstreamCancelGraceMs: env.UPSTREAM_CANCEL_GRACE_MS,
    eventStreamsMax: env.EVENT_STREAMS_MAX,
    usageRollupMs: env.USAGE_ROLLUP_MS,
    adminToken: env.ADMIN_TOKEN,
    apiKeys: (env.API_KEYS ?? '').split(',').map((k) => k.trim()).filter(Boolean),
    allowedOrigins: [...parseOriginList(env.ALLOWED_ORIGINS), ...parseOriginList(env.OLLAMA_ORIGINS)],
    trustProxy: env.TRUST_PROXY,
    warmModels: (env.WARM_MODELS ?? '').split(',').map((m) => m.trim()).filter(Boolean),
    tracing: env.OTEL_EXPORTER_OTLP_ENDPOINT == null
      ? undefined
      : {
          tracesUrl: wrap('OTEL_EXPORTER_OTLP_ENDPOINT', () => otlpTracesUrl(env.OTEL_EXPORTER_OTLP_ENDPOINT as string)),
          serviceName: env.OTEL_SERVICE_NAME ?? DEFAULT_SERVICE_NAME,
          headers: env.OTEL_EXPORTER_OTLP_HEADERS
        }
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
  const production = merged.NODE_ENV === 'production'
  return { port: env.PORT ?? (production ? 8080 : 5000), host: env.HOST, logLevel: env.LOG_LEVEL, production, shutdownGraceMs: env.SHUTDOWN_GRACE_MS }
}
