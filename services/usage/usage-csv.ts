/**
 * Usage rows as CSV (RFC 4180): a header line, CRLF line ends, a cell quoted when it holds a comma,
 * a quote or a line break. Names come from clients: a cell that a spreadsheet would run as a
 * formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) gets a leading `'`.
 */
import { USAGE_COUNTERS } from './usage-ledger.js'
import type { UsageDimension, UsageRow } from './usage-report.js'

const FORMULA_STARTS = new Set(['=', '+', '-', '@', '\t', '\r'])

export function csvCell (value: string | number): string {
  if (typeof value === 'number') return String(value)
  const safe = value.length > 0 && FORMULA_STARTS.has(value[0]) ? `'${value}` : value
  const quote = safe.includes(',') || safe.includes('"') || safe.includes('\n') || safe.includes('\r')
  return quote ? `"${safe.replaceAll('"', '""')}"` : safe
}

export function usageCsv (groupBy: UsageDimension[], rows: UsageRow[]): string {
  const columns = [...groupBy, ...USAGE_COUNTERS]
  const lines = [columns.join(',')]
  for (const row of rows) lines.push(columns.map((c) => csvCell(row[c] ?? '')).join(','))
  return lines.join('\r\n') + '\r\n'
}
