/**
 * The container image's HEALTHCHECK (the slim image has no curl): exit 0 when the gateway on this
 * machine answers 200 on /health/live, else 1. Reads PORT and HOST as the server does.
 */
const production = process.env.NODE_ENV === 'production'
const port = process.env.PORT != null && process.env.PORT !== '' ? process.env.PORT : production ? '8080' : '5000'
const host = process.env.HOST == null || ['', '0.0.0.0', '::'].includes(process.env.HOST) ? '127.0.0.1' : process.env.HOST
const origin = `http://${host.includes(':') ? `[${host}]` : host}:${port}`

fetch(`${origin}/health/live`, { signal: AbortSignal.timeout(3000) }).then(
  (res) => process.exit(res.status === 200 ? 0 : 1),
  () => process.exit(1)
)
