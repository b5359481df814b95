import Fastify, { LogController } from 'fastify'
import closeWithGrace from 'close-with-grace'
import maestro from './app.js'
import { configSources, serverSettings, type ServerSettings } from './services/config/config.js'
import { gatewayRequestId } from './services/http/exchange.js'
import { httpServerOptions } from './services/http/http-server.js'
import { asyncStdout } from './services/config/log-destination.js'

function fail (message: string): never {
  process.stderr.write(`ai-maestro-proxy: ${message}\n`)
  process.exit(1)
}

let settings: ServerSettings
try {
  settings = serverSettings(configSources())
} catch (err) {
  fail((err as Error).message)
}

const app = Fastify({
  logger: {
    level: settings.logLevel,
    // Pretty lines for a person at a terminal, JSON for everything else (written in batches).
    ...(process.stdout.isTTY
      ? { transport: { target: 'pino-pretty', options: { translateTime: 'HH:MM:ss.l', singleLine: true } } }
      : { stream: asyncStdout() })
  },
  // The gateway logs one line per finished request itself, instead of Fastify's two.
  logController: new LogController({ disableRequestLogging: true }),
  genReqId: gatewayRequestId,
  // The gateway's own BODY_LIMIT applies inside; this only bounds what reaches the app's parsers.
  bodyLimit: 1024 * 1024 * 1024,
  // While draining, requests that need a GPU get the gateway's own 503 (contract format, Retry-After)
  // from the lease manager; Fastify's generic closing answer would pre-empt it.
  return503OnClosing: false,
  // Slow or endless requests are cut off (answers, however long they stream, are not); requests
  // Node cannot parse are answered in the gateway's error format.
  ...httpServerOptions()
})

try {
  await app.register(maestro)
  await app.ready()
} catch (err) {
  const e = err as Error & { code?: string }
  fail(e.code === 'AVV_ERR_PLUGIN_EXEC_TIMEOUT' || e.code === 'AVV_ERR_READY_TIMEOUT'
    ? 'a service did not answer in time at start-up (is Redis reachable?)'
    : e.message.replace(/^env\//, ''))
}

closeWithGrace({ delay: settings.shutdownGraceMs }, async ({ signal, err }) => {
  if (err != null) app.log.error({ err }, 'closing after an error')
  else app.log.info({ signal }, 'shutting down: finishing in-flight requests')
  // A keep-alive connection whose last answer has ended would hold the close until it times out.
  const reaper = setInterval(() => { app.server.closeIdleConnections() }, 100)
  reaper.unref()
  await app.close()
})

try {
  await app.listen({ port: settings.port, host: settings.host })
} catch (err) {
  fail((err as Error).message)
}
