/*
 * transport: the registry of transports, looked up by the name a route's
 * "transport =" setting gives. Each transport module defines one const
 * struct transport_ops; adding a transport is one declaration and one row
 * below (OpenSMTPD's queue_backend.c keeps its backends the same way).
 */
#include "transports/transport.h"

#include <string.h>

extern const struct transport_ops smtp_transport_ops;
extern const struct transport_ops api_transport_ops;
extern const struct transport_ops relay_transport_ops;

static const struct transport_ops *const transport_table[] = {
    &smtp_transport_ops,
    &api_transport_ops,
    &relay_transport_ops,
};

const struct transport_ops *transport_find(const char *name)
{
    size_t i;

    if (name == NULL)
        return NULL;
    for (i = 0; i < sizeof(transport_table) / sizeof(transport_table[0]); i++)
        if (strcmp(transport_table[i]->name, name) == 0)
            return transport_table[i];
    return NULL;
}
