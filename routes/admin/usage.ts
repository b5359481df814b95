import type { FastifyPluginAsync } from 'fastify'
import { GatewayError } from '../../services/http/errors.js'
import { usageCsv } from '../../services/usage/usage-csv.js'
import { DEFAULT_USAGE_WINDOW_MS, USAGE_DIMENSIONS, usageReport, type UsageDimension } from '../../services/usage/usage-report.js'
import { AdminError } from './schemas.js'
import { UsageAnswer, UsageQuerystring } from './usage-schemas.js'

const adminOnly = { auth: 'admin', errorStyle: 'ollama' } as const
const tags = ['admin: usage']

/** Date, or date and time with an optional offset; every part fixed-width, so nothing backtracks. */
const ISO_TIME = /^\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,3})?)?(?:Z|[+-]\d{2}:\d{2})?)?$/

/** The tables' DATETIME ends with the year 9999. */
const LATEST = Date.UTC(9999, 11, 31)

function parseTime (name: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback
  // A date-time without an offset is UTC here (JavaScript would read it as local time).
  const withZone = value.length > 10 && !value.endsWith('Z') && value[value.length - 6] !== '+' && value[value.length - 6] !== '-' ? `${value}Z` : value
  const ms = ISO_TIME.test(value) ? Date.parse(withZone) : NaN
  if (!Number.isFinite(ms)) throw new GatewayError(400, `${name}: not an ISO date or date-time (e.g. 2025-01-31 or 2025-01-31T10:00:00Z)`)
  if (ms < 0 || ms >= LATEST) throw new GatewayError(400, `${name}: outside 1970 to 9999`)
  return ms
}

function parseGroupBy (value: string): UsageDimension[] {
  const parts = value.split(',').map((p) => p.trim())
  const dims: UsageDimension[] = []
  for (const part of parts) {
    if (!(USAGE_DIMENSIONS as readonly string[]).includes(part)) throw new GatewayError(400, `groupBy: ${JSON.stringify(part)} is not one of ${USAGE_DIMENSIONS.join(', ')}`)
    if (dims.includes(part as UsageDimension)) throw new GatewayError(400, `groupBy: ${part} named twice`)
    dims.push(part as UsageDimension)
  }
  return dims
}

/** `Accept: text/csv` (among others, before any JSON type): the rows as CSV. */
function wantsCsv (accept: string | undefined): boolean {
  if (accept === undefined) return false
  for (const range of accept.split(',')) {
    const type = range.split(';')[0].trim().toLowerCase()
    if (type === 'text/csv') return true
    if (type === 'application/json') return false
  }
  return false
}

/**
 * `GET /admin/usage` (CONTRACT 17): requests, tokens, images, audio, GPU-seconds and errors per
 * client, model, assignment or hour, from MariaDB's hourly roll-up plus what is still counted
 * in the lease store (a request shows at once). JSON, or CSV with `Accept: text/csv`.
 */
const usageRoutes: FastifyPluginAsync = async (fastify) => {
  fastify.get<{ Querystring: { from?: string, to?: string, groupBy?: string } }>('/admin/usage', {
    schema: {
      tags,
      querystring: UsageQuerystring,
      response: { 200: UsageAnswer, 400: AdminError, 401: AdminError },
      description: 'Usage over [from, to) (hours that start in it), summed per groupBy. `Accept: text/csv` answers CSV with a header line.'
    },
    config: adminOnly
  }, async (request, reply) => {
    const to = parseTime('to', request.query.to, Date.now())
    const from = parseTime('from', request.query.from, to - DEFAULT_USAGE_WINDOW_MS)
    if (from >= to) throw new GatewayError(400, 'from: must be before to')
    const groupBy = parseGroupBy(request.query.groupBy ?? 'client')
    const rows = await usageReport(fastify.usage, fastify.inventoryDb, { from, to, groupBy })
    if (wantsCsv(request.headers.accept)) {
      return reply.type('text/csv; charset=utf-8').send(usageCsv(groupBy, rows))
    }
    return { rows }
  })
}

export default usageRoutes
