-- Sample schema for docker-compose.yml: run once by the postgres image's entrypoint.
-- The tables match deploy/compose/cdc-invalidator/rules.yaml and connectors/postgres.json.

-- Debezium connects as a replication role (never the superuser).
CREATE ROLE debezium LOGIN REPLICATION PASSWORD 'debezium';
GRANT CONNECT ON DATABASE shop TO debezium;

CREATE TABLE public.categories (
    id   integer PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE public.products (
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    slug        text NOT NULL UNIQUE,
    price       numeric(10, 2) NOT NULL,
    category_id integer NOT NULL REFERENCES public.categories (id)
);

-- Deletes and updates carry the whole old row, so tag templates on category_id render from
-- the before image (connectors/README.md, "REPLICA IDENTITY").
ALTER TABLE public.categories REPLICA IDENTITY FULL;
ALTER TABLE public.products REPLICA IDENTITY FULL;

-- Written by the connector's heartbeat.action.query, so the slot advances on a quiet database.
-- Not in the publication: its rows are never change events.
CREATE TABLE public.debezium_heartbeat (
    id integer PRIMARY KEY,
    ts timestamptz NOT NULL
);

GRANT SELECT ON ALL TABLES IN SCHEMA public TO debezium;
GRANT INSERT, UPDATE ON public.debezium_heartbeat TO debezium;
-- The connector creates the publication for its table.include.list ("filtered"): it must own
-- the tables or be allowed to create publications on them.
GRANT CREATE ON DATABASE shop TO debezium;
ALTER TABLE public.categories OWNER TO debezium;
ALTER TABLE public.products OWNER TO debezium;

INSERT INTO public.categories (id, name) VALUES (5, 'Widgets'), (7, 'Gadgets');
INSERT INTO public.products (id, name, slug, price, category_id) VALUES
    (42, 'Blue Widget', 'blue-widget', 100.00, 5),
    (43, 'Red Gadget', 'red-gadget', 25.50, 7);
